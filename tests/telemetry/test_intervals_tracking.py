"""Interval means in logged records; TensorBoard event files; placements.jsonl written on change."""
from __future__ import annotations

import json

import pytest

from sparsetrain.parallel.placement import LayerPlacement
from sparsetrain.telemetry.intervals import IntervalMeans
from sparsetrain.telemetry.metrics import MetricsWriter
from sparsetrain.telemetry.tracking import load_image, scalars

pytestmark = pytest.mark.unit


def test_interval_means_and_last_step():
    iv = IntervalMeans()
    for step, loss in enumerate([4.0, 3.0, 2.0]):
        iv.add({"step": step, "loss": loss, "grad_norm": 1.0 + step}, 0.5)
    iv.add({"step": 3, "loss": float("nan"), "skipped": True}, 0.25)  # a skipped step still took its time
    assert iv.seconds == pytest.approx(1.75) and iv.steps == 4
    rec = iv.finish({"step": 3, "loss": 2.5, "grad_norm": 9.0, "lr": 0.1})
    assert rec["loss"] == pytest.approx(3.0) and rec["loss_last"] == 2.5
    assert rec["grad_norm"] == pytest.approx(2.0) and rec["lr"] == 0.1
    assert rec["interval_steps"] == 4
    nxt = iv.finish({"step": 4, "loss": 1.0})  # reset after finish: an empty interval keeps the value
    assert nxt["loss"] == 1.0 and nxt["interval_steps"] == 0 and iv.seconds == 0.0


def test_scalars_and_load_image():
    assert scalars({"step": 3, "loss": 1.5, "flag": True, "ranks": {"a": [1]}, "x": float("inf"),
                    "peak_memory_mib": [3.0, 5.0]}) == {"loss": 1.5, "peak_memory_mib_max": 5.0}
    img = load_image([[1.0, 3.0], [2.0, 2.0]], cell=2)
    assert tuple(img.shape) == (4, 4) and float(img.max()) == 1.0 and float(img[0, 0]) == pytest.approx(1 / 3)


def test_tensorboard_scalars_images_and_placements(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, enabled=True, fresh=True, trackers=["tensorboard"])
    p0 = LayerPlacement.from_lists([0, 1], [[0, 1], [1]])
    for step in range(4):
        w.note_loads([[10.0 + step, 2.0], [5.0, 5.0]])
        if step % 2:
            w.note_placement(step, [p0])  # unchanged at step 3: not written again
            w.write({"step": step, "loss": 4.0 - step, "tokens_per_s": 100.0, "ranks": {"x": [1.0]}})
    w.note_placement(4, [LayerPlacement.from_owners([1, 0])])
    w.close()
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 3]
    places = [json.loads(ln) for ln in (tmp_path / "placements.jsonl").read_text().splitlines()]
    assert [p["step"] for p in places] == [1, 4] and places[0]["layers"][0]["copies"] == [[0, 1], [1]]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert [e.value for e in acc.Scalars("loss")] == [3.0, 1.0]
    assert "tokens_per_s" in acc.Tags()["scalars"] and "ranks" not in acc.Tags()["scalars"]
    assert len(acc.Images("expert_load")) == 2


def test_a_resumed_writer_does_not_repeat_the_placement_in_use(tmp_path):
    """placements.jsonl is written when the placement changes: a resumed run's writer knows the last one."""
    p0 = LayerPlacement.from_lists([0, 1], [[0, 1], [1]])
    w = MetricsWriter(tmp_path, enabled=True, fresh=True)
    w.note_placement(1, [p0])
    w.close()
    w = MetricsWriter(tmp_path, enabled=True, fresh=False, start_step=3)
    w.note_placement(3, [p0])  # the restored placement: the same
    w.note_placement(4, [LayerPlacement.from_owners([1, 0])])
    w.close()
    places = [json.loads(ln) for ln in (tmp_path / "placements.jsonl").read_text().splitlines()]
    assert [p["step"] for p in places] == [1, 4]


def test_unknown_or_missing_tracker(tmp_path, monkeypatch):
    from sparsetrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.trackers='nope'"):
        load_config("tiny", ["train.trackers=[nope]"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        load_config("tiny", ["train.trackers=[tensorboard, wandb]"])


def test_comm_bytes_are_per_step_means_over_the_interval():
    iv = IntervalMeans()
    for step_bytes in ({"all_to_all": 100}, {"all_to_all": 100, "reshard": 600}, {"all_to_all": 100}):
        iv.add({"loss": 1.0})
        iv.add_comm(step_bytes)
    assert iv.comm_per_step() == {"all_to_all": 100.0, "reshard": 200.0}  # the re-shard was not on the log step
    iv.finish({"loss": 1.0})
    assert iv.comm_per_step() == {}
