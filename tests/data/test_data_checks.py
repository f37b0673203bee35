"""The run's tokenizer checked against model.vocab_size and the corpus; bad shards refused before any process."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from sparsetrain.data import DataError
from sparsetrain.data.check import check_data
from sparsetrain.data.prepare import prepare
from sparsetrain.data.shards import shard_name
from tests.data.conftest import data_cfg

pytestmark = [pytest.mark.unit]


@pytest.fixture(scope="module")
def bpe_corpus(text_dir, bpe_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe_corpus")
    prepare(data_cfg(f"data.source={text_dir}", f"data.corpus={out}", f"data.tokenizer={bpe_json}",
                     "data.shard_tokens=4000"), workers=1, progress=False, log=lambda m: None)
    return out


def _cfg(corpus, tok, vocab: int, *extra: str):
    return data_cfg(f"data.corpus={corpus}", f"data.tokenizer={tok}", f"model.vocab_size={vocab}", *extra)


def test_matching_tokenizer_and_padded_vocab_pass(bpe_corpus, bpe_json):
    info = check_data(_cfg(bpe_corpus, bpe_json, 384))  # model vocab padded above the tokenizer's 320
    assert info["tokenizer"]["vocab_size"] == 320 and info["dtype"] == "uint16"
    assert info["train_shards"] > 1 and info["val_split"] == "files" and info["train_tokens"] > 10_000


def test_model_vocab_below_tokenizer_refused(bpe_corpus, bpe_json):
    with pytest.raises(DataError, match=r"model.vocab_size=300 is smaller than .* \(320\)"):
        check_data(_cfg(bpe_corpus, bpe_json, 300))


def test_corpus_tokenized_with_another_tokenizer_refused(bpe_corpus, bpe_json):
    with pytest.raises(DataError, match="was tokenized with .*tokenizer.json.* but data.tokenizer='byte'"):
        check_data(_cfg(bpe_corpus, "byte", 384))
    with pytest.raises(DataError, match="data.corpus='stdlib' was tokenized with 'byte'"):
        check_data(_cfg("stdlib", bpe_json, 384))


def _train_cli(monkeypatch, *sets: str):
    """`sparsetrain train` in this process with every launch path replaced by a test failure."""
    from sparsetrain import launcher
    from sparsetrain.cli import app
    from sparsetrain.train import entry

    def spawned(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(launcher, "run_job", spawned)
    monkeypatch.setattr(entry, "run_inline", spawned)
    args = ["train", "-c", "tiny"]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(app, args)


def test_short_or_corrupt_shard_refused_before_spawn(bpe_corpus, bpe_json, tmp_path, monkeypatch):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bpe_corpus, bad)
    sets = (f"data.corpus={bad}", f"data.tokenizer={bpe_json}", "model.vocab_size=320", "launch.workers=2")
    victim = bad / shard_name("train", 1)
    victim.write_bytes(victim.read_bytes()[:1001])  # truncated mid-token
    r = _train_cli(monkeypatch, *sets)
    assert r.exit_code == 1, r.output
    assert "truncated or corrupt" in r.output and str(victim) in r.output and "process was started" not in r.output
    victim.write_bytes(b"")
    assert "truncated or corrupt" in _train_cli(monkeypatch, *sets).output
    r = _train_cli(monkeypatch, f"data.corpus={bpe_corpus}", sets[1], "model.vocab_size=256", "launch.workers=2")
    assert r.exit_code == 1 and "model.vocab_size=256 is smaller" in r.output


def test_a_shard_listed_outside_its_corpus_is_refused(bpe_corpus, tmp_path):
    import json
    import shutil

    from sparsetrain.data.shards import open_shard_dir

    bad = tmp_path / "bad"
    shutil.copytree(bpe_corpus, bad)
    meta = json.loads((bad / "meta.json").read_text())
    name = meta["shards"]["train"][0]["file"]
    shutil.copy(bad / name, tmp_path / name)
    meta["shards"]["train"][0]["file"] = f"../{name}"  # a real shard, outside the corpus directory
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=f"lists shard '../{name}' outside {bad}"):
        open_shard_dir(bad)


def test_token_over_vocab_in_unrecorded_corpus_refused_before_spawn(tmp_path, monkeypatch):
    d = tmp_path / "nano"
    d.mkdir()
    arr = np.full(500, 7, dtype=np.uint16)
    arr[3] = 999
    arr.tofile(d / "train.bin")
    arr[3] = 1
    arr.tofile(d / "val.bin")
    r = _train_cli(monkeypatch, f"data.corpus={d}", "launch.workers=2")
    assert r.exit_code == 1 and "token id 999 >= model.vocab_size=256" in r.output


def test_data_info_scans_every_token_of_an_unrecorded_corpus(tmp_path, monkeypatch):
    """A nanoGPT .bin dir has no recorded maxima: train checks a prefix, `data info` reads every token (in bounded
    chunks) and names the part and offset of an id >= model.vocab_size; the recorded maxima are used as they are."""
    from sparsetrain.data import check

    d = tmp_path / "nano"
    d.mkdir()
    arr = np.full(5000, 7, dtype=np.uint16)
    arr.tofile(d / "val.bin")
    arr = np.full((1 << 20) + 5000, 7, dtype=np.uint16)
    bad = (1 << 20) + 4321  # past the prefix train checks: only a full scan finds it
    arr[bad] = 300
    arr.tofile(d / "train.bin")
    monkeypatch.setattr(check, "SCAN_TOKENS", 1 << 18)  # several reads
    with pytest.raises(DataError, match=f"train part 0 .* token id 300 >= model.vocab_size=256 at token {bad}"):
        check_data(data_cfg(f"data.corpus={d}"))
    arr[bad] = 255
    arr.tofile(d / "train.bin")
    info = check_data(data_cfg(f"data.corpus={d}"))
    assert info["max_token_id"] == 255 and info["ids_checked"] == "full scan"


def test_data_info_uses_recorded_maxima(bpe_corpus, bpe_json):
    info = check_data(_cfg(bpe_corpus, bpe_json, 384))
    assert info["ids_checked"] == "recorded by data prepare" and 0 < info["max_token_id"] < 320


def test_checkpoint_records_tokenizer_and_generate_decodes_with_it(bpe_corpus, bpe_json, tmp_path):
    """Train on a BPE corpus, remove the tokenizer file: generate still decodes with the run's tokenizer."""
    import json
    import shutil

    from tests.test_cli import TINY, _sets, cli

    tok_copy = tmp_path / "tok.json"
    shutil.copy(bpe_json, tok_copy)
    out = tmp_path / "run"
    sets = _sets([*TINY, "train.steps=2", f"train.out_dir={out}", f"data.corpus={bpe_corpus}",
                  f"data.tokenizer={tok_copy}", "model.vocab_size=384"])
    r = cli("train", "-c", "tiny", *sets, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (ck,) = sorted((out / "checkpoints").glob("step_*"))
    rec = json.loads((ck / "trainer_state.json").read_text())["tokenizer"]
    assert rec["kind"] == "hf_file" and rec["vocab_size"] == 320 and rec["json"] == bpe_json.read_text()
    tok_copy.unlink()  # generate must not need the file any more
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("def main(")
    outs = []
    for flag in ("--cache", "--no-cache"):
        r = cli("generate", "-c", "tiny", *sets, "--prompt-file", str(prompt), "--tokens", "8",
                "--temperature", "0", flag, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.startswith("def main(") and "tokenizer " in r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]
    r = cli("generate", "-c", "tiny", *sets, "--set", "model.vocab_size=256", timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    # resuming this run with another tokenizer is refused before any process starts
    with pytest.raises(DataError, match="was trained with tokenizer .*tok.json.* this run uses 'byte'"):
        check_data(data_cfg("data.corpus=stdlib", "model.vocab_size=384", f"train.out_dir={out}"))
    check_data(data_cfg("data.corpus=stdlib", "model.vocab_size=384", f"train.out_dir={out}",
                        "checkpoint.resume=false"))
