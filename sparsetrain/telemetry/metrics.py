"""Metrics JSONL writer, log-line formatting and the end-of-run summary table."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Rank 0's run log: one JSON object per logged step in <out_dir>/metrics.jsonl, the same scalars to the
    trackers (TensorBoard by default; an expert-load heatmap image per log), placements.jsonl when it changes."""

    def __init__(self, out_dir: str | Path, enabled: bool, fresh: bool, trackers: Sequence[str] = (),
                 start_step: int = 0) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.placements_path = self.path.parent / "placements.jsonl"
        self.enabled = enabled
        self.trackers: list[Any] = []
        self.loads: list[list[float]] | None = None  # [L, E] token counts summed over the interval
        self.last_placement: list | None = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for p in (self.path, self.placements_path):
                if fresh and p.exists():
                    p.unlink()
            if not fresh and self.placements_path.exists():  # resumed: the placement written last (trimmed to
                lines = self.placements_path.read_text().splitlines()  # the checkpoint) is the one in use
                self.last_placement = json.loads(lines[-1])["layers"] if lines else None
            from sparsetrain.telemetry.tracking import open_trackers

            self.trackers = open_trackers(list(trackers), self.path.parent, start_step)

    def note_loads(self, counts: list[list[float]]) -> None:
        """Add one step's per-layer expert token counts [L, E] to the interval's heatmap."""
        if self.loads is None:
            self.loads = [list(row) for row in counts]
        else:
            self.loads = [[a + b for a, b in zip(r0, r1)] for r0, r1 in zip(self.loads, counts)]

    def note_placement(self, step: int, placements: Sequence[Any]) -> None:
        """Append the per-layer owners and copies to placements.jsonl when they differ from the last written."""
        if not self.enabled or not placements:
            return
        layers = [{"owners": list(p.owners), "copies": [list(c) for c in p.copies]} for p in placements]
        if layers != self.last_placement:
            self.last_placement = layers
            with self.placements_path.open("a") as f:
                f.write(json.dumps({"step": step, "layers": layers}) + "\n")

    def write(self, record: dict[str, Any], resumed_from: int | None = None) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers:
            from sparsetrain.telemetry.tracking import load_image, scalars

            values = scalars(record)
            for t in self.trackers:
                t.log(record["step"], values)
                if self.loads is not None:
                    t.image(record["step"], "expert_load", load_image(self.loads))
        self.loads = None

    def close(self) -> None:
        """Flush and close the trackers."""
        for t in self.trackers:
            t.close()
        self.trackers = []


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint step so the file reads like one run."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", -1) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def format_log(rec: dict[str, Any]) -> str:
    """One human line per interval."""
    parts = [f"step {rec['step']:>5}", f"loss {rec['loss']:.4f}"]
    if "val_loss" in rec:
        parts.append(f"val {rec['val_loss']:.4f}")
    parts += [f"lr {rec['lr']:.2e}", f"tok/s {rec['tokens_per_s']:,.0f}"]
    if "step_ms" in rec:
        parts.append(f"step {rec['step_ms']:,.0f}ms")
    if "tflops_per_rank" in rec:
        tf = rec["tflops_per_rank"]
        parts.append(f"TFLOP/s/rank {tf:.3g}" + (f" MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""))
    if rec.get("peak_memory_mib"):
        parts.append(f"mem max {max(rec['peak_memory_mib']):,.0f}MiB")
    if "expert_load_max_mean" in rec:
        parts.append(f"load max/mean {rec['expert_load_max_mean']:.2f}")
    if "spag_MB" in rec:
        parts.append(f"spAG {rec['spag_MB']:.2f}MB spRS {rec['sprs_MB']:.2f}MB")
    if "a2a_MB" in rec:
        parts.append(f"a2a {rec['a2a_MB']:.2f}MB")
    if "dropped_slots" in rec:
        parts.append(f"dropped {rec['dropped_slots']}")
    return " | ".join(parts)


def summary_table(rows: list[tuple[str, Any]]) -> str:
    """A two-column aligned table."""
    width = max(len(k) for k, _ in rows) if rows else 0
    lines = ["=" * (width + 32), "run summary", "-" * (width + 32)]
    for k, v in rows:
        vs = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"{k:<{width}}  {vs}")
    lines.append("=" * (width + 32))
    return "\n".join(lines)


def placement_table(layers: list[dict[str, Any]]) -> str:
    """Hottest experts per layer: predicted load, owner rank, ranks holding a copy."""
    lines = ["hottest experts (predicted tokens/step, owner, copies):"]
    for layer in layers:
        cells = [f"e{x['expert']}: {x['load']:.0f} tok, owner r{x['owner']}, copies {x['copies']}"
                 for x in layer["experts"]]
        lines.append(f"  layer {layer['layer']}: " + " | ".join(cells))
    return "\n".join(lines)
