"""spAG / spRS on CUDA: posted on the side stream, results ordered before use on the compute stream (NCCL)."""
from __future__ import annotations

import pytest
import torch

from sparsetrain.parallel.sparse_collectives import _side_stream, spag_start, sprs_start

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("transport", ["a2a", "p2p"])
def test_spag_then_sprs_on_the_side_stream(nccl_group, transport):
    dev = torch.device("cuda", 0)
    e, c = 4, 1 << 16
    owners, copies = [0] * e, [[0]] * e
    owned = torch.randn(e, c, device=dev)
    main = torch.cuda.current_stream(dev)
    torch.cuda._sleep(50_000_000)  # keep the compute stream busy: the gather must still see `owned` written
    owned.mul_(2)  # enqueued after the sleep on the compute stream
    handle = spag_start(owned, list(range(e)), owners, copies, nccl_group, transport=transport)
    assert _side_stream(dev) is not main
    mat, mat_ids = handle.wait()
    assert mat_ids == list(range(e))
    torch.testing.assert_close(mat, owned)  # gathered rows equal the (doubled) owned rows
    grads = torch.randn(e, c, device=dev)
    rs = sprs_start(grads, mat_ids, owners, copies, nccl_group, transport=transport)
    summed, owned_ids = rs.wait()
    assert owned_ids == list(range(e))
    torch.testing.assert_close(summed, grads)  # one rank: the owner's own rows
    torch.cuda.synchronize()


def test_fssdp_prefetch_trains_on_cuda(nccl_group, tmp_path):
    """World-1 none/EP/FSSDP training steps on the GPU with the process group up (the trainer's CUDA path)."""
    from sparsetrain.config import load_config
    from sparsetrain.parallel.mesh import DistInfo
    from sparsetrain.train.trainer import Trainer

    for strategy in ("none", "ep", "fssdp"):
        cfg = load_config("tiny", ["launch.workers=1", f"parallel.strategy={strategy}", "train.device=cuda",
                                   "train.steps=3", "train.log_every=1", "train.eval_every=0", "train.progress=false",
                                   f"train.out_dir={tmp_path / strategy}", "checkpoint.save_final=false",
                                   "checkpoint.resume=false", "data.batch_size=8"])
        summary = Trainer(cfg, DistInfo(device=torch.device("cuda", 0))).fit()
        assert summary["steps_run"] == 3 and summary["peak_memory_mib"][0] > 0
