"""benchmarks/reshard_move.py at a tiny shape: one row per move size, bytes from what a move ships."""
from __future__ import annotations

import pytest

pytestmark = [pytest.mark.distributed]


def test_reshard_move_prints_one_row_per_move_size(capsys):
    from benchmarks import reshard_move

    reshard_move.main(["--experts", "4", "--d-model", "8", "--d-ffn", "16", "--layers", "2", "--moves", "1", "2",
                       "--repeats", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 2"]
    per_expert = 3 * 3 * 8 * 16 * 4  # (w1, w2, w3) x (param, exp_avg, exp_avg_sq) x d x f x fp32
    assert [float(r.split(" | ")[1]) for r in rows] == pytest.approx([n * 2 * per_expert / 2**20 for n in (1, 2)], rel=5e-3)


def test_reshard_move_refuses_more_moves_than_a_half():
    from benchmarks import reshard_move

    with pytest.raises(SystemExit):
        reshard_move.main(["--experts", "4", "--moves", "3"])
