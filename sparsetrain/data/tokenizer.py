"""Tokenizers behind one small interface: byte-level (stdlib), Hugging Face `tokenizers` JSON / hub, tiktoken.

`data.tokenizer` spec -> tokenizer:
- `byte`: UTF-8 bytes, vocabulary 256, no special tokens (the embedded default).
- a path to a `tokenizer.json` (Hugging Face `tokenizers`, e.g. from `sparsetrain data train-tokenizer`).
- `hf:<name>`: a tokenizer from the Hugging Face hub (needs network, `tokenizers` installed).
- `tiktoken:<encoding>`: a tiktoken encoding, e.g. `tiktoken:gpt2` (needs `tiktoken`; it downloads its files).

`record()` is what a run stores in its checkpoints and shard metadata: kind, name, vocabulary size,
end-of-text id, and for JSON tokenizers the file's SHA-256 and (checkpoints only) the JSON itself, so
`generate` decodes with exactly the tokenizer the run trained with.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

from sparsetrain.data.errors import DataError
from sparsetrain.textio import read_utf8

EOT = "<|endoftext|>"  # end-of-text special token appended after every document (when the tokenizer has it)


class Tokenizer(Protocol):
    """What data preparation and generation need from a tokenizer."""

    name: str
    vocab_size: int  # ids are in [0, vocab_size)
    eot_id: int | None  # appended after each document; None: documents are concatenated as they are

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of the ids (invalid UTF-8 replaced)."""
        ...

    def record(self, with_content: bool = False) -> dict[str, Any]:
        """JSON-able description (with the tokenizer file's content when asked)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (what the stdlib corpus holds)."""

    name, vocab_size, eot_id = "byte", 256, None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def record(self, with_content: bool = False) -> dict[str, Any]:
        return {"kind": "byte", "name": "byte", "vocab_size": 256, "eot_id": None}


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("this tokenizer needs the `tokenizers` package: pip install 'sparsetrain[data]'") from None
    return tokenizers


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` (JSON file or hub name)."""

    def __init__(self, tok: Any, name: str, kind: str, content: str) -> None:
        self.tok, self.name, self.kind, self.content = tok, name, kind, content
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.eot_id = tok.token_to_id(EOT)
        self.sha256 = hashlib.sha256(content.encode()).hexdigest()

    @classmethod
    def from_json(cls, content: str, name: str, kind: str = "hf_file") -> HFTokenizer:
        tokenizers = _import_tokenizers()
        try:
            tok = tokenizers.Tokenizer.from_str(content)
        except Exception as e:  # noqa: BLE001 - the Rust side raises plain Exception
            raise DataError(f"data.tokenizer={name!r}: not a Hugging Face tokenizer JSON: {str(e)[:200]}") from None
        return cls(tok, name, kind, content)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def record(self, with_content: bool = False) -> dict[str, Any]:
        rec = {"kind": self.kind, "name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
               "sha256": self.sha256}
        if with_content:
            rec["json"] = self.content
        return rec


class TiktokenTokenizer:
    """A tiktoken encoding (its BPE files download from the network the first time)."""

    def __init__(self, encoding: str) -> None:
        try:
            import tiktoken
        except ImportError:
            raise DataError(f"data.tokenizer=tiktoken:{encoding} needs the `tiktoken` package "
                            f"(pip install tiktoken)") from None
        try:
            self.enc = tiktoken.get_encoding(encoding)
        except Exception as e:  # noqa: BLE001 - unknown name (ValueError) or any network error
            raise DataError(f"data.tokenizer=tiktoken:{encoding}: {str(e).splitlines()[0][:200]}") from None
        self.name, self.vocab_size, self.eot_id = f"tiktoken:{encoding}", int(self.enc.n_vocab), self.enc.eot_token

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def record(self, with_content: bool = False) -> dict[str, Any]:
        return {"kind": "tiktoken", "name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id}


def _hub_tokenizer(name: str) -> HFTokenizer:
    tokenizers = _import_tokenizers()
    try:
        tok = tokenizers.Tokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - hub and network errors come in many types
        raise DataError(f"data.tokenizer=hf:{name}: could not load from the Hugging Face hub (needs network): "
                        f"{str(e).splitlines()[0][:200]}") from None
    return HFTokenizer(tok, f"hf:{name}", "hf_hub", tok.to_str())


def read_tokenizer_json(path: Path) -> str:
    """The text of a tokenizer.json file; one-line DataError naming it when unreadable or not UTF-8."""
    try:
        return read_utf8(path, f"data.tokenizer={str(path)!r}: not a UTF-8 tokenizer JSON", DataError)
    except OSError as e:
        raise DataError(f"data.tokenizer: cannot read {path}: {e.strerror}") from None


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by a `data.tokenizer` spec (see the module docstring)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("hf:"):
        return _hub_tokenizer(spec[3:])
    if spec.startswith("tiktoken:"):
        return TiktokenTokenizer(spec[len("tiktoken:"):])
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise DataError(f"data.tokenizer: file not found: {path} (train one with `sparsetrain data "
                            f"train-tokenizer`, or use byte, hf:<name>, tiktoken:<encoding>)")
        return HFTokenizer.from_json(read_tokenizer_json(path), str(path))
    raise DataError(f"data.tokenizer={spec!r}; allowed: byte, a tokenizer.json path, hf:<hub name>, "
                    f"tiktoken:<encoding>")


def tokenizer_from_record(rec: dict[str, Any], fallback_spec: str = "byte") -> Tokenizer:
    """Rebuild the tokenizer a checkpoint recorded (the JSON it carries, else by name)."""
    if not rec:
        return load_tokenizer(fallback_spec)
    kind = rec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind in ("hf_file", "hf_hub") and rec.get("json"):
        tok = HFTokenizer.from_json(rec["json"], rec.get("name", "checkpoint"), kind)
        if rec.get("sha256") and tok.sha256 != rec["sha256"]:
            raise DataError(f"tokenizer {rec.get('name')!r} recorded in the checkpoint fails its SHA-256 check")
        return tok
    if kind == "tiktoken":
        return TiktokenTokenizer(str(rec["name"]).split(":", 1)[1])
    raise DataError(f"checkpoint records tokenizer kind {kind!r} without its content; cannot rebuild it")


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records name the same vocabulary (by content hash for JSON tokenizers)."""
    if a.get("sha256") or b.get("sha256"):
        return a.get("sha256") == b.get("sha256")
    return (a.get("kind"), a.get("name"), a.get("vocab_size")) == (b.get("kind"), b.get("name"), b.get("vocab_size"))


def check_tokenizer(spec: str, model_vocab: int, corpus: str, corpus_record: dict[str, Any] | None) -> Tokenizer:
    """The run's tokenizer, checked against model.vocab_size and the tokenizer the corpus was prepared with."""
    tok = load_tokenizer(spec)
    if tok.vocab_size > model_vocab:
        raise DataError(f"model.vocab_size={model_vocab} is smaller than the vocabulary of data.tokenizer={spec!r} "
                        f"({tok.vocab_size}); set model.vocab_size >= {tok.vocab_size}")
    if corpus_record and not same_tokenizer(corpus_record, tok.record()):
        raise DataError(f"data.corpus={corpus!r} was tokenized with {corpus_record.get('name')!r} "
                        f"(vocab {corpus_record.get('vocab_size')}), but data.tokenizer={spec!r} "
                        f"(vocab {tok.vocab_size}); run `sparsetrain data prepare` with this tokenizer "
                        f"and point data.corpus at its output")
    return tok


def check_resume_tokenizer(saved: dict[str, Any] | None, current: Tokenizer, checkpoint: str) -> None:
    """Refuse to resume a checkpoint trained with another tokenizer (its ids would mean other text)."""
    if saved and not same_tokenizer(saved, current.record()):
        raise DataError(f"checkpoint {checkpoint} was trained with tokenizer {saved.get('name')!r} "
                        f"(vocab {saved.get('vocab_size')}), this run uses {current.name!r} (vocab "
                        f"{current.vocab_size}); start a new run (another train.out_dir, or checkpoint.resume=false)")
