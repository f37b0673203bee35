"""The training loop: one screen of logic; strategies, data and checkpoints plug in."""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import torch

from sparsetrain.config import Config, to_dict
from sparsetrain.data import TokenBatches
from sparsetrain.data.tokenizer import check_resume_tokenizer
from sparsetrain.model.gpt import GPT, build_model
from sparsetrain.model.init import materialize_
from sparsetrain.parallel import build_strategy
from sparsetrain.parallel.mesh import DistInfo, all_reduce_mean
from sparsetrain.telemetry.comm import COMM
from sparsetrain.telemetry.gpu import gpu_metrics
from sparsetrain.telemetry.intervals import IntervalMeans
from sparsetrain.telemetry.memory import PeakMemory, return_freed_memory, warm_imports
from sparsetrain.telemetry.metrics import MetricsWriter, format_log, truncate_after
from sparsetrain.telemetry.timers import TIMERS, span
from sparsetrain.train import checkpoint as ckpt
from sparsetrain.train.async_checkpoint import AsyncCheckpointer
from sparsetrain.train.faults import maybe_inject, maybe_kill_in_save, poison_
from sparsetrain.train.fingerprint import fingerprint
from sparsetrain.train.guards import NanGuard, NonFiniteLossError, all_finite, stop_flag
from sparsetrain.train.heartbeat import beat, enter
from sparsetrain.train.location import Location, download_logs, local_dir, upload_logs
from sparsetrain.train.optim import build_optimizer, lr_at
from sparsetrain.train.step_collectives import log_step_metrics, reduce_step
from sparsetrain.train.summary import run_summary, throughput

__all__ = ["NonFiniteLossError", "Trainer"]


def grads_of_kind(grads: list[torch.Tensor], dtensor: bool) -> list[torch.Tensor]:
    """The DTensor (FSDP2-sharded) gradients, or the plain ones."""
    return [g for g in grads if hasattr(g, "to_local") == dtensor]


def clip_grads_(model: torch.nn.Module, clip: float) -> None:
    """Scale every gradient by `clip` (< 1). A function of its own: its lists of gradients die with it, not at
    the end of the step (they kept every gradient alive past `zero_grad` through `after_step`'s re-shard)."""
    if clip >= 1.0:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    for same_kind in (g for g in (grads_of_kind(grads, True), grads_of_kind(grads, False)) if g):
        torch._foreach_mul_(same_kind, clip)  # DTensor and plain grads never mix in one call


class Trainer:
    """Builds model + strategy + optimizer + data from a Config and runs train / eval."""

    def __init__(self, cfg: Config, info: DistInfo | None = None) -> None:
        self.cfg, self.info = cfg, info or DistInfo()
        self.device = self.info.device
        warm_imports()
        if self.device.type == "cpu" and cfg.train.cpu_exact_memory:
            return_freed_memory()  # RSS then follows live tensors (see telemetry/memory.py), at a speed cost
        self.memory = PeakMemory(self.device)  # baseline: after imports, before the run allocates
        self.strategy = build_strategy(cfg, self.info)
        model = build_model(cfg, "meta")  # nothing allocated until the strategy says what this rank holds
        self.sparsifier = None
        if cfg.sparsity.enabled:  # before sharding: FSDP2 then shards the parametrized originals
            from sparsetrain.sparsity import apply_sparsity

            self.sparsifier = apply_sparsity(model, cfg.sparsity)
        self.model: GPT = materialize_(self.strategy.apply(model), self.device, cfg.train.seed)
        if cfg.train.activation_checkpointing != "none":
            from sparsetrain.offload.checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(self.model, cfg.train.activation_checkpointing)
        self.offload = None
        if cfg.offload.enabled:
            from sparsetrain.offload import enable_activation_offload

            self.offload = enable_activation_offload(self.model, cfg.offload)
        self.activation_report: dict[str, Any] = {}  # measured on the first step run (summary)
        self.optimizer = self.strategy.wrap_optimizer(
            self.model, build_optimizer(self.strategy.trainable(self.model), cfg.train))
        self.data = TokenBatches(cfg, self.info.rank, self.info.world)
        self.out_dir = local_dir(cfg.train.out_dir)  # logs; for a URL out_dir a local mirror, uploaded at commits
        self.ckpt_dir = ckpt.checkpoint_root(cfg.train.out_dir, cfg.checkpoint.dir)
        self.async_ckpt = AsyncCheckpointer(cfg.launch.timeout_s) if cfg.checkpoint.async_save else None
        self.start_step = 0
        self.stopped_at: int | None = None  # step at which a stop request (SIGTERM) ended the run
        self.nan_guard = NanGuard(cfg.train.on_nan, cfg.train.max_skipped_steps, self._print)
        self.history: list[dict[str, Any]] = []
        self.train_s = 0.0  # wall seconds spent in training steps (no eval / checkpoint)

    # ----------------------------------------------------------------- helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.train.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _progress(self) -> bool:
        return self.info.is_main and self.cfg.train.progress and os.environ.get("SPARSETRAIN_PROGRESS", "1") != "0"

    def _print(self, msg: str) -> None:
        if self.info.is_main:
            from tqdm import tqdm

            tqdm.write(msg)

    def maybe_resume(self) -> None:
        """Load the newest checkpoint in checkpoint.dir that verifies, when resume is on."""
        if not self.cfg.checkpoint.resume:
            return
        if not self.strategy.checkpoints:  # peers: their expert layout is not sparsetrain's checkpoint keys
            if ckpt.committed(self.ckpt_dir):
                self._print(f"parallel.strategy={self.strategy.name} neither saves nor resumes checkpoints: "
                            f"starting at step 0, {self.ckpt_dir} left as it is (docs/peers.md)")
            return
        path, manifest, refused = ckpt.find_resumable(self.ckpt_dir)
        if refused:
            self._print(ckpt.fallback_line(self.ckpt_dir, path, refused))
        if path is None:
            return
        extra = ckpt.read_extra(path)
        check_resume_tokenizer(extra.get("tokenizer"), self.data.tokenizer, str(path))
        changed = ckpt.resume_config_changes(extra, to_dict(self.cfg), path)
        if changed:
            self._print(f"config changed since {path.name} (run control, allowed): {'; '.join(changed)}")
        self.start_step = int(extra["step"]) + 1
        self._restore(path, manifest, extra, self.start_step)
        if self.info.is_main:
            download_logs(self.cfg.train.out_dir)  # a URL out_dir resumed on a fresh node: its logs so far
            for log in ("metrics.jsonl", "expert_loads.jsonl", "placements.jsonl"):  # read like one run
                truncate_after(self.out_dir / log, int(extra["step"]))
        self._print(f"resumed from {path} at step {self.start_step}")

    def save(self, step: int) -> Location | None:
        """Commit a checkpoint of this step (its path; with checkpoint.async the previous save's, once committed,
        while this one is written); never from weights that are not finite (returns None then)."""
        if not all_finite(self.model.parameters()):
            self._print(f"step {step}: weights are not finite; no checkpoint written (the last one stays the newest)")
            return None
        extra = {"strategy": self.strategy.extra_state(), "config": to_dict(self.cfg),
                 "fingerprint": fingerprint(to_dict(self.cfg)),
                 "tokenizer": self.data.tokenizer.record(with_content=True)}  # generate decodes with it
        args = (self.ckpt_dir, step, self.model, self.optimizer, extra, self.cfg.checkpoint.keep)
        hook = lambda: maybe_kill_in_save(self.info.rank, step, self.out_dir)
        save = self.async_ckpt.save if self.async_ckpt else ckpt.save_checkpoint
        path = save(*args, before_commit=hook)  # async: the previous save's path, once committed
        if self.info.is_main and path is not None:
            upload_logs(self.cfg.train.out_dir)
        return path

    def flush_checkpoint(self) -> None:
        """checkpoint.async: wait until the save in flight is committed (end of run, SIGTERM, rollback)."""
        if self.async_ckpt is not None and self.async_ckpt.pending is not None:
            enter(self.out_dir, self.info.rank, "save")  # a slow store is no stall for the launcher's watcher
            if self.async_ckpt.wait() is not None and self.info.is_main:
                upload_logs(self.cfg.train.out_dir)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation cross entropy (nats/token) over data.eval_batches fixed batches. Capacity mode drops per
        forward, so there each batch runs in training micro-batches (w ranks = one process, grad_accum x w)."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        parts = self.cfg.train.grad_accum if self.cfg.moe.capacity_factor > 0 else 1
        for i in range(self.cfg.data.eval_batches):
            x, y = (t.to(self.device) for t in self.data.val_batch(i))
            for xm, ym in zip(x.chunk(parts), y.chunk(parts), strict=True):  # [B/parts, S] each
                with self._autocast():
                    total += self.model(xm, ym).loss.float() / parts
        self.model.train()
        return float(all_reduce_mean(total / self.cfg.data.eval_batches))

    # ----------------------------------------------------------------- one step
    def train_step(self, step: int) -> dict[str, Any]:
        cfg = self.cfg.train
        lr = lr_at(step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        beat(self.out_dir, self.info.rank, step, "data")  # phases let the launcher's watcher name a stalled rank
        x_all, y_all = self.data.train_batch(step)
        beat(self.out_dir, self.info.rank, step, "compute")
        self.model.set_routing_step(step)
        micro = x_all.shape[0] // cfg.grad_accum
        stats = torch.zeros(5, device=self.device)  # ce, aux, z, dropped slots (capacity mode), stop requested
        counts = global_counts = None  # [L_moe, E] this rank's routed slots / summed over ranks by the forward
        t_fwd = t_bwd = 0.0
        for mi in range(cfg.grad_accum):
            x = x_all[mi * micro:(mi + 1) * micro].to(self.device)
            y = y_all[mi * micro:(mi + 1) * micro].to(self.device)
            t0 = time.perf_counter()
            with self._autocast():
                out = self.model(x, y)
                loss = out.loss + out.aux_loss + out.z_loss
            t1 = time.perf_counter()
            self.strategy.before_backward(last_micro=mi == cfg.grad_accum - 1)
            self.strategy.backward(loss / cfg.grad_accum)
            t_fwd, t_bwd = t_fwd + t1 - t0, t_bwd + time.perf_counter() - t1
            stats[:3] += torch.stack([out.loss.detach().float(), out.aux_loss.detach().float(),
                                      out.z_loss.detach().float()]).to(self.device) / cfg.grad_accum
            stats[3] += float(out.dropped) / cfg.grad_accum  # a host number: no host-to-device copy
            if out.tokens_per_expert is not None:
                c = out.tokens_per_expert.detach().float()
                counts = c if counts is None else counts + c
            if out.global_tokens_per_expert is not None:  # the forward's one count reduction (aux loss)
                g = out.global_tokens_per_expert.detach().float()
                global_counts = g if global_counts is None else global_counts + g
        if maybe_inject(self.info.rank, step, self.out_dir, self.ckpt_dir):  # test fault hooks (train/faults.py)
            poison_(self.model.parameters(), stats)  # fault "nan": this rank's loss and gradients become NaN
        beat(self.out_dir, self.info.rank, step, "sync")
        stats[4] = stop_flag()
        own_norm = self.strategy.owns_optimizer_step
        want_counts = counts if global_counts is None else None
        # dense=ddp: the gradient all-reduce also carries the step's numbers (ONE collective, like a minimal loop)
        red = None if own_norm or self.sparsifier is not None else \
            self.strategy.reduce_step_fused(self.model, stats, want_counts)
        if red is None:
            self.strategy.finish_backward(self.model)
            if self.sparsifier is not None:
                self.sparsifier.add_decay_grads()
            # ONE collective for this step's numbers: losses/flags (mean), squared grad norm and counts (sums)
            red = reduce_step(stats, None if own_norm else self.strategy.local_grad_sq(self.model), want_counts,
                              self.info.world)
        stats = red.stats
        if red.counts is not None:
            global_counts = red.counts
        ce = float(stats[0])
        rec: dict[str, Any] = {"step": step, "loss": ce, "aux_loss": float(stats[1]), "z_loss": float(stats[2]),
                               "lr": lr, "fwd_s": t_fwd, "bwd_s": t_bwd}
        if self.cfg.moe.capacity_factor > 0:  # slots dropped this step, all ranks and micro-batches
            rec["dropped_slots"] = round(float(stats[3]) * cfg.grad_accum * self.info.world)
        if float(stats[4]) > 0:
            rec["stop"] = True
        if not torch.isfinite(stats[:3]).all():
            action = self.nan_guard.handle(step, ce)  # raises under on_nan=error or past max_skipped_steps
            self.optimizer.zero_grad(set_to_none=True)
            self.model.drop_routing_counts()  # the dropped step's counts must not steer the aux-free bias
            if action == "rollback":
                self._rollback(step)
            rec["skipped"] = True
            return rec
        with span("optimizer"):
            if own_norm:
                gnorm = self.strategy.optimizer_step()
            else:
                gnorm = red.grad_sq.sqrt().float()
                if cfg.grad_clip > 0:
                    clip_grads_(self.model, min(1.0, cfg.grad_clip / (float(gnorm) + 1e-6)))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for moe in self.model.moe_layers():
                moe.router.update_bias()
            if self.sparsifier is not None:
                self.sparsifier.step(step + 1)
        rec["grad_norm"] = float(gnorm)
        if self.sparsifier is not None and ((step + 1) % cfg.log_every == 0 or step == cfg.steps - 1):
            rec.update({f"nm_{k}": float(v) for k, v in self.sparsifier.stats().items()})
        if global_counts is not None:
            global_counts = global_counts.float()
        new_opt = self.strategy.after_step(step, self.model, self.optimizer, global_counts)
        if new_opt is not None:
            self.optimizer = new_opt
        if global_counts is not None:
            rec["expert_load_max_mean"] = float((global_counts.max(1).values
                                                 / global_counts.mean(1).clamp_min(1e-9)).mean())
            rec["_counts"] = global_counts.cpu().tolist()
        return rec

    # ----------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train for train.steps, log, evaluate, checkpoint; returns the summary (rank 0)."""
        from tqdm import tqdm

        cfg = self.cfg
        self.maybe_resume()
        writer = MetricsWriter(self.out_dir, self.info.is_main, fresh=self.start_step == 0,
                               trackers=cfg.train.trackers, start_step=self.start_step)
        intervals = IntervalMeans()  # logged losses/timings are means over the steps since the last log
        if self.info.is_main:  # what `sparsetrain sim calibrate` and `report` read back beside the metrics
            import yaml

            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        loads_path = self.out_dir / "expert_loads.jsonl"
        if self.info.is_main and self.start_step == 0 and loads_path.exists():
            loads_path.unlink()
        TIMERS.cuda_events = self.device.type == "cuda"
        bar = tqdm(total=cfg.train.steps, initial=self.start_step, disable=not self._progress(),
                   dynamic_ncols=True, leave=False)
        t_start, val_loss = time.perf_counter(), None
        self.model.train()
        for step in range(self.start_step, cfg.train.steps):
            COMM.reset()
            last = step == cfg.train.steps - 1
            evals = bool(cfg.train.eval_every) and ((step + 1) % cfg.train.eval_every == 0 or last)
            TIMERS.enabled = (step + 1) % cfg.train.log_every == 0 or last or evals  # spans: log steps only
            t0 = time.perf_counter()
            rec = self._measured_step(step) if step == self.start_step else self.train_step(step)
            dt = time.perf_counter() - t0  # ends after the loss / grad norm reached the host: device work done
            if self.offload is not None:
                rec.update(self.offload.step_metrics())
            intervals.add(rec, dt)
            intervals.add_comm(COMM.snapshot())  # this step's bytes, before any eval traffic
            self.train_s += dt
            counts = rec.pop("_counts", None)
            if counts is not None and self.info.is_main:
                with loads_path.open("a") as f:
                    f.write(json.dumps({"step": step, "counts": counts}) + "\n")
                writer.note_loads(counts)
            if evals:
                TIMERS.enabled = False  # the log line's spans are the training step's
                beat(self.out_dir, self.info.rank, step, "eval")
                val_loss = self.evaluate()
                rec["val_loss"] = val_loss
            if (step + 1) % cfg.train.log_every == 0 or last or "val_loss" in rec:
                rec.update(throughput(self.cfg, self.device, self.info.world, intervals.seconds, intervals.steps))
                rec.update(log_step_metrics(self.strategy, self.memory, intervals.comm_per_step(), self.info.world))
                rec.update(gpu_metrics())
                intervals.finish(rec)
                writer.note_placement(step, getattr(self.strategy, "placements", None))
                writer.write(rec)
                self._print(format_log(rec))
                self.history.append(rec)
            else:
                TIMERS.pop()
            beat(self.out_dir, self.info.rank, step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            every = cfg.checkpoint.every
            if ((every and (step + 1) % every == 0) or (last and cfg.checkpoint.save_final) or rec.get("stop")) \
                    and self.strategy.checkpoints:
                beat(self.out_dir, self.info.rank, step + 1, "save")
                self.save(step)
            if rec.get("stop"):
                self.stopped_at = step
                self._print(f"stop requested (SIGTERM): stopped after step {step}, checkpoint in {self.ckpt_dir}; "
                            f"run the same command to resume")
                break
        bar.close()
        writer.close()
        self.flush_checkpoint()
        elapsed = time.perf_counter() - t_start
        TIMERS.enabled = False
        if self.start_step >= cfg.train.steps:  # resumed a finished run: report it instead of nothing
            self._print(f"run already complete at step {cfg.train.steps} (checkpoint in {self.ckpt_dir}); "
                        f"raise train.steps to train on, or use another train.out_dir to train again")
            self.history = self._logged_records()[-1:]
            val_loss = self.evaluate()
        return run_summary(self, elapsed, val_loss)

    def _measured_step(self, step: int) -> dict[str, Any]:
        """One step with the activation meter on: saved bytes per block (and what offload took) for the summary."""
        from sparsetrain.offload.meter import ActivationMeter

        with ActivationMeter(self.model) as meter:
            rec = self.train_step(step)
        saved = dict(sorted(meter.bytes_by_block.items()))
        host = self.offload.stats()["offloaded_bytes_by_block"] if self.offload is not None else {}
        micro = self.cfg.train.grad_accum
        self.activation_report = {  # per micro-batch, this rank; MiB
            "activation_MiB_by_block": {i: round(b / micro / 2**20, 4) for i, b in saved.items()},
            "activation_on_device_MiB_by_block": {i: round((b - host.get(i, 0)) / micro / 2**20, 4)
                                                  for i, b in saved.items()},
            "activation_checkpointing": self.cfg.train.activation_checkpointing,
        }
        return rec

    def _restore(self, path: Location, manifest: Any, extra: dict[str, Any], next_step: int) -> None:
        """Load checkpoint `path` into this run, which goes on with step `next_step` (resume and rollback alike)."""
        held = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.strategy.load_extra_state(extra.get("strategy", {}), self.model)  # FSSDP: ownership before weights
        trainable = [p for _, p in self.strategy.trainable(self.model)]
        if {id(p) for p in trainable} != {id(p) for p in held}:  # experts re-owned: an optimizer over them
            self.optimizer = build_optimizer(self.strategy.trainable(self.model), self.cfg.train)
        ckpt.load_checkpoint(path, self.model, self.optimizer, manifest)
        if self.sparsifier is not None:  # N:M schedules follow the global step (masks refresh from the weights)
            self.sparsifier.load_state_dict({"step": next_step})

    def _rollback(self, step: int) -> None:
        """on_nan=rollback: reload the newest committed checkpoint (weights, optimizer, strategy state)."""
        enter(self.out_dir, self.info.rank, "load")  # hashing and reading a large one may take minutes
        self.flush_checkpoint()
        path, manifest, refused = ckpt.find_resumable(self.ckpt_dir)  # the newest one that verifies
        if refused:
            self._print(ckpt.fallback_line(self.ckpt_dir, path, refused))
        if path is None:
            raise NonFiniteLossError(f"non-finite loss at step {step} with train.on_nan=rollback, but no committed "
                                     f"checkpoint in {self.ckpt_dir} to roll back to (set checkpoint.every)")
        self._restore(path, manifest, ckpt.read_extra(path), step + 1)  # FSSDP owners first, as a resume
        self._print(f"rolled back to {path.name}; training goes on with the batch of step {step + 1}")

    def _logged_records(self) -> list[dict[str, Any]]:
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
