"""A world-1 NCCL process group for the CUDA-only tests (one GPU: NCCL cannot put two ranks on one device)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


@pytest.fixture(scope="session")
def nccl_group(tmp_path_factory):
    """The default process group on NCCL with this process as its only rank (cuda:0)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if dist.is_initialized():
        if dist.get_backend() != "nccl":
            pytest.skip("a non-NCCL process group is already initialised in this process")
        yield dist.group.WORLD
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("nccl") / "store"), 1)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield dist.group.WORLD
    dist.destroy_process_group()
