"""`sparsetrain` command line: train, eval, generate, config, plan, submit, jobs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import typer

from sparsetrain.config import Config, ConfigError, load_config, to_dict
from sparsetrain.data.commands import data_app
from sparsetrain.textio import read_utf8

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train Mixture-of-Experts and N:M-sparse transformers (FSSDP, EP, N:M).")

ConfigOpt = typer.Option("tiny", "--config", "-c", help="YAML preset path or name under configs/")
SetOpt = typer.Option(None, "--set", "-s", help="override, e.g. --set train.steps=10 (repeatable)")
SINGLE = ["parallel.strategy=none", "launch.workers=1"]  # eval/generate run on one process


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _known_errors() -> tuple[type[BaseException], ...]:
    from sparsetrain.data.errors import DataError
    from sparsetrain.train.checkpoint import CheckpointError
    from sparsetrain.train.run_lock import RunLockError

    errs: list[type[BaseException]] = [ConfigError, DataError, CheckpointError, RunLockError]
    try:
        from sparsetrain.train.trainer import NonFiniteLossError

        errs.append(NonFiniteLossError)
    except ImportError:
        pass
    try:
        from sparsetrain.launcher.errors import LaunchError

        errs.append(LaunchError)
    except ImportError:
        pass
    return tuple(errs)


def _load(config: str, overrides: list[str] | None, world_size: int | None = None) -> Config:
    try:
        return load_config(config, overrides or [], world_size)
    except ConfigError as e:
        _fail(str(e))
    raise AssertionError("unreachable")


def _preflight(cfg: Config, training: bool = True, data: bool = True) -> None:
    """Planner, memory and data checks before any process starts (sparsetrain.preflight); one line, exit 1."""
    from sparsetrain.preflight import preflight

    try:
        preflight(cfg, training, data)
    except _known_errors() as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 1)


@app.command()
def train(config: str = ConfigOpt, overrides: list[str] | None = SetOpt) -> None:
    """Train: in-process for 1 worker, else N workers via the launcher (Ray by default)."""
    cfg = _load(config, overrides)
    from sparsetrain.train.location import check_urls
    from sparsetrain.train.run_lock import run_lock
    from sparsetrain.train.storage import in_ray_job, resolve_job_storage

    try:
        if in_ray_job():  # a Ray job's working dir is deleted with it: outputs go to durable storage
            for change in resolve_job_storage(cfg):
                typer.echo(f"storage: {change}", err=True)
        check_urls(cfg.train.out_dir, cfg.checkpoint.dir)  # s3:// without s3fs etc.: one line, nothing started
    except ConfigError as e:
        _fail(str(e))

    _preflight(cfg)  # planner, memory, and local data (every shard and the tokenizer) before any process starts
    try:
        from sparsetrain.train.checkpoint import checkpoint_root, preflight_resume

        preflight_resume(to_dict(cfg))  # another model's checkpoint, or an earlier run's, refused before any start
        root = str(checkpoint_root(cfg.train.out_dir, cfg.checkpoint.dir))
        with run_lock(cfg.train.out_dir, root, log=lambda m: typer.echo(m, err=True)):
            if cfg.launch.workers == 1 and not cfg.launch.address and cfg.launch.backend != "torchrun":
                from sparsetrain.train.entry import run_inline

                run_inline(to_dict(cfg))
            else:
                from sparsetrain.launcher import run_job

                run_job(cfg)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except _known_errors() as e:
        _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 1)


@app.command("config")
def show_config(config: str = ConfigOpt, overrides: list[str] | None = SetOpt) -> None:
    """Print the resolved config (YAML) after presets and overrides."""
    import yaml

    typer.echo(yaml.safe_dump(to_dict(_load(config, overrides)), sort_keys=False))


@app.command("eval")
def evaluate(config: str = ConfigOpt, overrides: list[str] | None = SetOpt,
             checkpoint: str | None = typer.Option(None, help="checkpoint dir (default: latest in out_dir)")) -> None:
    """Validation loss of a checkpoint on one process."""
    cfg = _load(config, (overrides or []) + SINGLE)
    _preflight(cfg, training=False)
    try:
        from sparsetrain.data import TokenBatches
        from sparsetrain.train.offline_eval import run_slices, single_process_model, val_loss

        model, path, extra = single_process_model(cfg, checkpoint)
        loss = val_loss(model, TokenBatches(cfg), cfg.data.eval_batches, run_slices(cfg, extra))
        typer.echo(json.dumps({"checkpoint": str(path), "val_loss": loss}))
    except _known_errors() as e:
        _fail(str(e), 1)


@app.command()
def generate(config: str = ConfigOpt, overrides: list[str] | None = SetOpt,
             checkpoint: str | None = typer.Option(None, help="checkpoint dir (default: latest in out_dir)"),
             prompt: str = typer.Option("def ", help="text prompt"),
             prompt_file: str | None = typer.Option(None, help="read the prompt from this file (UTF-8)"),
             tokens: int = typer.Option(200, help="new tokens to sample (at most)"),
             temperature: float = typer.Option(0.8, help="0 = greedy"), top_k: int = typer.Option(40, help="0 = off"),
             top_p: float = typer.Option(1.0, help="nucleus sampling mass (1 = off)"),
             seed: int = typer.Option(0), cache: bool = typer.Option(True, help="KV cache (--no-cache: full "
                                                                         "forward per token, for comparison)"),
             stop_at_eot: bool = typer.Option(True, help="stop at the tokenizer's end-of-text token")) -> None:
    """Sample text from a checkpoint, decoded with the tokenizer the run trained with."""
    cfg = _load(config, (overrides or []) + SINGLE)
    if not 0 < top_p <= 1:
        _fail(f"--top-p must be in (0, 1], got {top_p}")
    if tokens < 0 or top_k < 0:
        _fail(f"--tokens and --top-k must be >= 0, got {tokens} and {top_k}")
    if not math.isfinite(temperature) or temperature < 0:
        _fail(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    _preflight(cfg, training=False, data=False)
    try:
        import time

        from sparsetrain.data.tokenizer import tokenizer_from_record
        from sparsetrain.model.sample import generate as sample_ids
        from sparsetrain.train.offline_eval import single_process_model

        text = prompt
        if prompt_file is not None:
            try:
                text = read_utf8(prompt_file, f"--prompt-file {prompt_file}: not UTF-8 text", ValueError)
            except OSError as e:
                _fail(f"--prompt-file {prompt_file}: {e.strerror}")
            except ValueError as e:
                _fail(str(e))
        model, _, extra = single_process_model(cfg, checkpoint, workload=False)
        tok = tokenizer_from_record(extra.get("tokenizer") or {}, cfg.data.tokenizer)
        if tok.vocab_size > cfg.model.vocab_size:
            _fail(f"the checkpoint's tokenizer {tok.name!r} has {tok.vocab_size} tokens but model.vocab_size="
                  f"{cfg.model.vocab_size}", 1)
        ids = tok.encode_batch([text])[0] or tok.encode_batch(["\n"])[0]
        t0 = time.perf_counter()
        gen = sample_ids(model, ids, tokens, temperature, top_k, top_p, seed, use_cache=cache,
                         vocab_limit=tok.vocab_size, stop_id=tok.eot_id if stop_at_eot else None)
        secs = time.perf_counter() - t0
        typer.echo(tok.decode(ids + gen.ids))
        typer.echo(f"[{len(gen.ids)} tokens in {secs:.2f}s, {len(gen.ids) / max(secs, 1e-9):.1f} tokens/s, "
                   f"{gen.positions} positions run, {'KV cache' if cache else 'no cache'}, tokenizer {tok.name}]",
                   err=True)
    except _known_errors() as e:
        _fail(str(e), 1)


@app.command()
def plan(config: str = ConfigOpt, overrides: list[str] | None = SetOpt,
         cluster: str = typer.Option("", help="cluster for the predicted step time (default: h100-sxm-8x for GPU "
                                     "configs, cpu-2core otherwise)"),
         as_json: bool = typer.Option(False, "--json", help="print the memory plan as JSON (memory_mib_per_rank)"),
         ) -> None:
    """Print per-rank memory, the initial FSSDP placement and the predicted step time, without training."""
    cfg = _load(config, overrides)
    from sparsetrain.parallel.plan_report import plan_json, plan_report
    from sparsetrain.preflight import check_planner, check_sparsity
    from sparsetrain.sim.scale import plan_cluster, plan_prediction

    try:
        check_planner(cfg)
        check_sparsity(cfg)
        plan_cluster(cfg, cluster)  # a bad --cluster fails before the plan prints
        if as_json:
            typer.echo(plan_json(cfg))
            return
        typer.echo(plan_report(cfg))
        typer.echo(plan_prediction(cfg, cluster))
    except (ConfigError, ValueError) as e:
        _fail(str(e))


@app.command()
def report(path: str = typer.Argument(..., help="a run dir (metrics.jsonl) or a sweep dir (sweep.jsonl)"),
           out: str | None = typer.Option(None, help="output dir (default: PATH/report)")) -> None:
    """Write PNG plots and a Markdown page for a run or a sweep."""
    from sparsetrain.report import write_report

    try:
        md = write_report(path, out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        _fail(str(e), 1)
    typer.echo(f"wrote {md} ({len(list(md.parent.glob('*.png')))} PNGs)")


@app.command()
def sweep(path: str = typer.Argument(..., help="sweep file, e.g. configs/sweeps/strategies_skew.yaml"),
          retry_failed: bool = typer.Option(True, help="rerun points recorded as failed"),
          dry_run: bool = typer.Option(False, help="validate and list the points without running them")) -> None:
    """Run a grid/list of configs, one launcher run per point; resumable; writes sweep.csv + sweep.jsonl."""
    from sparsetrain.launcher.errors import LaunchError
    from sparsetrain.launcher.sweep import load_sweep, run_sweep

    try:
        sw = load_sweep(path)
        if dry_run:
            for p in sw.points:
                typer.echo(f"{p.index:>3}  {p.point_id}  " + ", ".join(f"{k}={v}" for k, v in p.keys.items()))
            return
        rows = run_sweep(sw, retry_failed=retry_failed)
    except LaunchError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        _fail("interrupted (finished points are kept; run the same command to resume)", 130)
    ok = sum(r["status"] == "ok" for r in rows)
    typer.echo(f"{ok}/{len(sw.points)} points ok; table: {sw.out_dir / 'sweep.csv'} "
               f"(report: sparsetrain report {sw.out_dir})")
    if ok < len(sw.points):
        raise typer.Exit(1)


def _writable_dir(d: Path, what: str) -> None:
    """Create output directory `d` (and parents) now, so a bad path fails before the work, not after it."""
    from sparsetrain.train.run_lock import ensure_writable_dir

    try:
        ensure_writable_dir(d)
    except OSError as e:
        raise ValueError(f"{what} {d}: not a writable directory ({e.strerror or e})") from None


def _check_sim_ep_size(cfg: Config, counts: list[int], variants: tuple[str, ...]) -> None:
    """parallel.ep_size against each predicted world (not launch.workers): it must divide every --gpus value."""
    ep = cfg.parallel.ep_size
    if not ep or not any(v.partition("-")[0] == "ep" for v in variants):
        return  # only the ep variant uses it; the others shard experts over the whole world
    if cfg.moe.num_experts % ep:
        raise ValueError(f"moe.num_experts={cfg.moe.num_experts} is not divisible by parallel.ep_size={ep}")
    bad = [g for g in counts if g % ep]
    if bad:
        raise ValueError(f"parallel.ep_size={ep} does not divide {bad[0]} GPUs (--gpus "
                         f"{','.join(map(str, counts))}); choose GPU counts that are multiples of it")


RunDirsArg = typer.Argument(..., help="run directories (config.yaml + metrics.jsonl)")
sim_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Step-time simulator: predict, calibrate.")
app.add_typer(sim_app, name="sim")


@sim_app.command("predict")
def sim_predict(config: str = ConfigOpt, overrides: list[str] | None = SetOpt,
                cluster: str = typer.Option("h100-sxm-8x", help="name under configs/clusters/ or a YAML path"),
                gpus: str = typer.Option("8,64,512,4096", help="comma-separated GPU counts"),
                workload: str = typer.Option("", help="zipf:S or an expert_loads.jsonl / run dir "
                                             "(default: zipf:moe.router_skew)"),
                batch_per_gpu: int = typer.Option(0, help="sequences per GPU (default: data.batch_size / workers)"),
                variants: str = typer.Option("dp,ep,fssdp-hecate,fssdp-lpt_spill,fssdp-eplb",
                                             help="strategies / fssdp-PLANNER"),
                out: str = typer.Option("runs/sim", help="directory for predictions.json and PNGs")) -> None:
    """Predict step time, tokens/s, MFU, memory and bytes per link vs GPU count for each strategy."""
    cfg = _load(config, overrides, world_size=1)  # the world-dependent checks: per --gpus value, below
    from sparsetrain.sim.cluster import load_cluster
    from sparsetrain.sim.scale import format_table, scale_rows, write_outputs
    from sparsetrain.sim.shape import setup_from_config

    try:
        bad = [g for g in gpus.split(",") if g.strip() and not g.strip().isdigit()]
        if bad:
            raise ValueError(f"--gpus takes comma-separated GPU counts, got {bad[0].strip()!r} in {gpus!r}")
        counts = list(dict.fromkeys(int(g) for g in gpus.split(",") if g.strip()))  # a repeated count once
        if not counts or min(counts) < 1:
            raise ValueError(f"--gpus needs GPU counts >= 1, got {gpus!r}")
        if batch_per_gpu < 0:
            raise ValueError(f"--batch-per-gpu must be >= 1 (0: data.batch_size / launch.workers), got {batch_per_gpu}")
        names = tuple(v.strip() for v in variants.split(",") if v.strip())
        _check_sim_ep_size(cfg, counts, names)
        c = load_cluster(cluster)
        per_gpu = batch_per_gpu or max(1, cfg.data.batch_size // cfg.launch.workers)
        rows = scale_rows(setup_from_config(cfg), c, counts, workload or f"zipf:{cfg.moe.router_skew}", per_gpu,
                          names, cfg)
        _writable_dir(Path(out), "--out")
    except ValueError as e:
        _fail(str(e))
    typer.echo(format_table(rows, c.hbm_bytes))
    pngs = write_outputs(rows, Path(out), f"{config} on {c.name}, {per_gpu} seq/GPU, {workload or 'zipf'}")
    typer.echo(f"wrote {Path(out) / 'predictions.json'} and {len(pngs)} PNGs under {out}")


@sim_app.command("calibrate")
def sim_calibrate(run_dirs: list[str] = RunDirsArg,
                  base: str = typer.Option("cpu-2core", help="cluster whose unfitted numbers are kept"),
                  name: str = typer.Option("calibrated", help="name of the fitted cluster"),
                  out: str = typer.Option("", help="write the fitted cluster YAML here")) -> None:
    """Fit compute, link, optimizer and overhead constants from measured runs."""
    from sparsetrain.sim.calibrate import calibrate
    from sparsetrain.sim.cluster import load_cluster

    try:
        if out:
            _writable_dir(Path(out).parent, "--out's directory")
        fitted, diag = calibrate(run_dirs, load_cluster(base), name)
    except ValueError as e:
        _fail(str(e))
    text = fitted.to_yaml()
    if out:
        Path(out).write_text(f"# fitted by sparsetrain sim calibrate from {len(run_dirs)} runs: "
                             f"{', '.join(run_dirs)}\n" + text)
    typer.echo(text + json.dumps(diag))


def _mount_launcher() -> None:
    """Job commands live in sparsetrain.launcher (Ray imported only when they run)."""
    try:
        from sparsetrain.launcher.jobs import jobs_app, submit_command
    except ImportError:
        return
    app.command("submit")(submit_command)
    app.add_typer(jobs_app, name="jobs", help="Status, logs or stop of a submitted Ray job.")


_mount_launcher()
app.add_typer(data_app, name="data", help="Prepare token shards from local corpora; train a BPE tokenizer.")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
