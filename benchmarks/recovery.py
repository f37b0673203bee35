"""Recovery per fault kind: time from the fault to training again, and steps trained again.

Each kind is one `sparsetrain train`-equivalent run (torchrun, 2 gloo ranks, tiny shapes, launch.max_failures=1)
with one injected fault (sparsetrain/train/faults.py), plus one uninterrupted run for the wall-time baseline.
The ranks run through an entry that also appends every heartbeat to `<out_dir>/beats.log` (the heartbeat
files themselves are overwritten each phase and cleared at a restart), so afterwards:

  recovery_s  = end of the first step completed after the fault - the fault's time (faults.jsonl); for a
                restart this is teardown + new group + resume load + one step; for `delay` the delay plus the
                rest of the step; for `nan` (train.on_nan=rollback) the reload plus one step
  redone      = steps completed when the fault hit - the step the group went on from (0 for delay; for nan the
                steps rolled back, which are not replayed)
  overhead_s  = wall time of the run - wall time of the uninterrupted run

    python benchmarks/recovery.py                       # every kind, 10 steps each
    python benchmarks/recovery.py --kinds kill stall --steps 12 --json /tmp/recovery.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPE = ["model.d_model=64", "model.n_layers=2", "model.seq_len=32", "moe.d_ffn=64", "data.batch_size=8",
         "train.log_every=1", "train.eval_every=0", "train.warmup_steps=2", "train.progress=false",
         "train.trackers=[]", "checkpoint.every=2", "parallel.strategy=fssdp", "parallel.pretend_nodes=0",
         "launch.workers=2", "launch.torch_threads=1", "launch.backend=torchrun", "launch.max_failures=1"]
# kind: (fault mode, rank, extra overrides)
KINDS = {
    "raise": ("raise", 1, []),
    "kill": ("kill", 1, []),
    "stall": ("stall", 1, ["launch.timeout_s={timeout_s}"]),  # the heartbeat watcher / collective timeout
    "delay": ("delay", 1, []),
    "corrupt": ("corrupt", 0, []),
    "save_kill": ("save_kill", 0, []),
    "nan": ("nan", 1, ["train.on_nan=rollback"]),
}
ENTRY = "benchmarks.recovery:logged_worker"


def logged_worker(cfg_dict: dict) -> dict | None:
    """train_worker, with every heartbeat also appended to <out_dir>/beats.log (runs in each rank)."""
    from sparsetrain.train import trainer
    from sparsetrain.train.entry import train_worker
    from sparsetrain.train.heartbeat import beat

    log = Path(cfg_dict["train"]["out_dir"]) / "beats.log"

    def logged(out_dir: str | Path, rank: int, steps_done: int, phase: str = "done") -> None:
        beat(out_dir, rank, steps_done, phase)
        with log.open("a") as f:
            f.write(f"{rank} {steps_done} {phase} {time.time():.4f}\n")

    trainer.beat = logged
    return train_worker(cfg_dict)


def _beats(out: Path) -> list[tuple[int, int, str, float]]:
    rows = []
    for line in (out / "beats.log").read_text().splitlines():
        r, s, p, t = line.split()
        rows.append((int(r), int(s), p, float(t)))
    return rows


def run_one(kind: str | None, steps: int, step_at: int, timeout_s: float, delay_s: float, root: Path) -> dict:
    """One run (kind None: no fault); its measurements."""
    from sparsetrain.launcher import run_job
    from sparsetrain.launcher.env import patched_env
    from sparsetrain.launcher.errors import LaunchError

    from sparsetrain.config import load_config

    out = root / (kind or "baseline")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    mode, rank, extra = KINDS[kind] if kind else ("", 0, [])
    env = {"SPARSETRAIN_FAULTS": f"{mode}@{step_at}:{rank}" if kind else "", "SPARSETRAIN_FAIL_DELAY_S": str(delay_s),
           "SPARSETRAIN_PROGRESS": "0", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cfg = load_config("tiny", [*SHAPE, *(e.format(timeout_s=timeout_s) for e in extra), f"train.steps={steps}",
                               f"train.out_dir={out}"])
    t0, ok, err = time.time(), True, ""
    with patched_env(env):
        try:
            run_job(cfg, ENTRY)
        except LaunchError as e:
            ok, err = False, str(e).splitlines()[0]
    rec = {"kind": kind or "none", "ok": ok, "wall_s": round(time.time() - t0, 2)}
    if not ok:
        return rec | {"error": err}
    if not kind:
        return rec
    if not (out / "faults.jsonl").exists():  # e.g. the first attempt failed before the fault's step
        return rec | {"ok": False, "error": "the fault never fired (see the output above)"}
    fault = json.loads((out / "faults.jsonl").read_text().splitlines()[0])
    done_at_fault = fault["step"] + (1 if mode == "save_kill" else 0)  # save_kill: its step ran, not committed
    after = sorted((t, s) for r, s, p, t in _beats(out) if p == "done" and t > fault["time"])
    if not after:
        return rec | {"error": "no step completed after the fault"}
    t_again, steps_then = after[0]
    went_on_from = steps_then - 1
    return rec | {"fault_step": fault["step"], "rank": fault["rank"], "recovery_s": round(t_again - fault["time"], 2),
                  "redone": max(done_at_fault - went_on_from, 0) if mode not in ("delay", "nan") else 0,
                  "rolled_back": (done_at_fault - _rolled_to(out, fault["time"])) if mode == "nan" else 0}


def _rolled_to(out: Path, t_fault: float) -> int:
    """nan + rollback: the step count of the checkpoint rolled back to (from metrics.jsonl, skipped step)."""
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    bad = next((r["step"] for r in recs if r.get("skipped")), None)
    every = next(int(v.split("=")[1]) for v in SHAPE if v.startswith("checkpoint.every="))
    return (bad // every) * every if bad is not None else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fault-step", type=int, default=5, help="the step the fault fires in (checkpoint.every=2)")
    p.add_argument("--timeout-s", type=float, default=20.0, help="launch.timeout_s of the stall run (others: 300)")
    p.add_argument("--delay-s", type=float, default=2.0, help="how long a delay fault holds rank 1")
    p.add_argument("--json", default="", help="append one JSON line per run here")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="st-recovery-"))
    rows = [run_one(None, args.steps, args.fault_step, args.timeout_s, args.delay_s, root)]
    print(f"uninterrupted: {rows[0]['wall_s']:.1f} s", flush=True)
    for kind in args.kinds:
        rows.append(run_one(kind, args.steps, args.fault_step, args.timeout_s, args.delay_s, root))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["wall_s"]
    print("\n| fault | rank | at step | recovered | recovery_s | steps redone | overhead_s |\n|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        redone = f"{r.get('redone', '-')}" + (f" ({r['rolled_back']} rolled back)" if r.get("rolled_back") else "")
        print(f"| {r['kind']} | {r.get('rank', '-')} | {r.get('fault_step', '-')} | {'yes' if r['ok'] else 'NO: ' + r.get('error', '')} "
              f"| {r.get('recovery_s', '-')} | {redone} | {r['wall_s'] - base:.1f} |")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
