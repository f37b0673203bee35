"""Offload and activation checkpointing under every strategy (one saved-tensor stack shared with FSSDP).

For dp, ep and fssdp (release and keep_materialized, re-sharding on, grad accumulation 2) on 2 gloo ranks:
offload changes no gradient bit, offloads exactly the configured block, and under FSSDP offloads the same
tensors whatever keep_materialized says (gathered expert copies are never offloaded); full and selective
checkpointing (alone and with offload) change no loss or gradient bit, and FSSDP's replay re-gathers by spAG.
One distributed launch runs every variant (start-up dominates on a loaded machine).
"""
from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.offload.strategy_runs import assert_grads_equal, run_variants, variant

pytestmark = [pytest.mark.distributed]

OFFLOAD = ["offload.enabled=true", "offload.every_k_layers=2", "offload.min_tensor_bytes=0"]
COMMON = ["train.grad_accum=2", "moe.router_skew=1.2"]
FSSDP = ["parallel.strategy=fssdp", "parallel.fssdp.reshard_every=2", "parallel.fssdp.sprs_post=backward"]
BASES = {
    "dp": ["parallel.strategy=dp"],
    "ep": ["parallel.strategy=ep"],
    "fssdp_release": [*FSSDP, "parallel.fssdp.keep_materialized=false"],
    "fssdp_keep": [*FSSDP, "parallel.fssdp.keep_materialized=true"],
}


# checkpointing variants: (base, mode, with offload); every strategy and mode appears at least once
CKPT = [("dp", "full", False), ("ep", "selective", False), ("fssdp_release", "full", False),
        ("fssdp_release", "selective", True), ("fssdp_keep", "selective", False)]


def ckpt_name(base: str, mode: str, offload: bool) -> str:
    return f"{base}+{mode}" + ("+offload" if offload else "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    variants = {}
    for name, extra in BASES.items():
        variants[name] = variant(*COMMON, *extra)
        variants[f"{name}+offload"] = variant(*COMMON, *extra, *OFFLOAD)
    for base, mode, off in CKPT:
        variants[ckpt_name(base, mode, off)] = variant(*COMMON, *BASES[base], f"train.activation_checkpointing={mode}",
                                                        *(OFFLOAD if off else []))
    return run_distributed(run_variants, 2, variants, str(tmp_path_factory.mktemp("offload")), timeout=1200)


@pytest.mark.parametrize("base", list(BASES))
def test_offload_changes_no_gradient_bit(runs: list[dict], base: str) -> None:
    for rank, res in enumerate(runs):
        assert_grads_equal(res[base], res[f"{base}+offload"], f"{base} rank {rank}")
        assert res[base]["losses"] == res[f"{base}+offload"]["losses"]


@pytest.mark.parametrize("base", list(BASES))
def test_offload_takes_every_activation_of_the_configured_block(runs: list[dict], base: str) -> None:
    for res in runs:
        got = res[f"{base}+offload"]
        for st in got["offload"]:
            assert set(st["offloaded_bytes_by_block"]) == {1}, st["offloaded_bytes_by_block"]  # every_k_layers=2
            assert st["offloaded_tensors_by_block"][1] == st["offloaded_tensors"] > 0
            assert st["pool_in_use_bytes"] == 0  # every buffer came back after backward
        first = got["offload"][0]
        # min_tensor_bytes=0: what reached block 1's level of the stack (the meter) went to host, except
        # expanded views (cheaper on device) -- in particular the expert FFN's tensors under FSSDP's release
        saved = got["saved_bytes_by_block"][1]
        assert first["offloaded_bytes"] + first["kept_other_bytes"] == saved, (first, saved)


def test_fssdp_offloads_the_same_tensors_whatever_keep_materialized(runs: list[dict]) -> None:
    for res in runs:
        release, keep = res["fssdp_release+offload"], res["fssdp_keep+offload"]
        assert release["reshard_moves"] >= 1, "the case must re-shard"
        for a, b in zip(release["offload"], keep["offload"]):
            assert a["offloaded_tensors_by_block"] == b["offloaded_tensors_by_block"]
            assert a["offloaded_bytes_by_block"] == b["offloaded_bytes_by_block"]
    # spAG bytes sent, summed over steps and ranks (a rank owning no copied expert sends none)
    spag = [sum(c.get("spag", 0) for res in runs for c in res[name]["comm"])
            for name in ("fssdp_release+offload", "fssdp_keep+offload")]
    assert spag[0] > spag[1] > 0, f"release must re-gather in backward: spAG bytes {spag}"


@pytest.mark.parametrize("case", CKPT, ids=[ckpt_name(*c) for c in CKPT])
def test_checkpointing_changes_no_loss_or_gradient_bit(runs: list[dict], case: tuple) -> None:
    base = case[0]
    for rank, res in enumerate(runs):
        got = res[ckpt_name(*case)]
        assert got["losses"] == res[base]["losses"]
        assert_grads_equal(res[base], got, f"{ckpt_name(*case)} rank {rank}")
        if case[1] == "full":  # every block keeps only its input
            assert all(got["saved_bytes_by_block"][b] < 0.3 * res[base]["saved_bytes_by_block"][b] for b in (0, 1))
        else:  # the FFN keeps only its input; attention keeps its tensors
            assert all(got["saved_bytes_by_block"][b] < res[base]["saved_bytes_by_block"][b] for b in (0, 1))


def test_checkpoint_replay_regathers_and_composes_with_offload(runs: list[dict]) -> None:
    def spag(name: str) -> int:
        return sum(c.get("spag", 0) for res in runs for c in res[name]["comm"])

    # keep_materialized gathers once per step; the selective replay gathers the released copies again
    assert spag("fssdp_keep+selective") > spag("fssdp_keep") > 0
    # release: the replay's gather replaces the output-grad re-gather, same bytes
    assert spag("fssdp_release+full") == spag("fssdp_release")
    for res in runs:
        off, both = res["fssdp_release+offload"]["offload"], res["fssdp_release+selective+offload"]["offload"]
        for a, b in zip(off, both):  # the checkpointed FFN leaves only its input for offload to take
            assert 0 < b["offloaded_bytes_by_block"][1] < a["offloaded_bytes_by_block"][1]
