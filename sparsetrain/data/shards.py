"""Token shards on disk: `<dir>/meta.json` + `train_NNNNNN.bin` / `val_NNNNNN.bin` (raw uint16 or uint32).

A shard is a flat little-endian array of token ids with no header (nanoGPT's `.bin` layout), so any tool
can memory-map it. `meta.json` names the dtype, the tokenizer, and every shard with its token count;
readers check each file's byte size against it before anything trains, so a truncated or corrupt
shard is refused with a message naming the file. A directory holding only `train.bin` / `val.bin`
(nanoGPT, uint16, no metadata) is read too.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsetrain.data.errors import DataError

META = "meta.json"
PREPARE_STATE = ".prepare-state.json"  # present while `data prepare` is unfinished (see prepare.py)
FORMAT = "sparsetrain-token-shards"
VERSION = 1
DTYPES: dict[str, np.dtype] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian on disk
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id fits (vocab <= 65,536), else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size must be > 0, got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray, dtype: str) -> dict[str, Any]:
    """Write tokens as `dtype` atomically (temp name, then rename); returns the shard's meta entry."""
    path = Path(path)
    np_dtype = DTYPES[dtype]
    arr = np.asarray(tokens)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > np.iinfo(np_dtype).max):
        raise DataError(f"{path.name}: token ids [{int(arr.min())}, {int(arr.max())}] do not fit {dtype}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    arr.astype(np_dtype).tofile(tmp)
    os.replace(tmp, path)
    return {"file": path.name, "tokens": int(arr.size), "max_id": int(arr.max()) if arr.size else -1}


def write_meta(root: str | Path, meta: dict[str, Any]) -> None:
    """Write meta.json atomically."""
    root = Path(root)
    tmp = root / f".{META}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, root / META)


def read_meta(root: str | Path) -> dict[str, Any]:
    """meta.json of a shard directory, checked for format, version and dtype."""
    path = Path(root) / META
    try:
        meta = json.loads(path.read_text())
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-run `sparsetrain data prepare`") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{path}: not a sparsetrain shard index (format {found!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise DataError(f"{path}: shard format version {meta.get('version')!r}; this sparsetrain reads {VERSION}")
    if meta.get("dtype") not in DTYPES:
        raise DataError(f"{path}: dtype {meta.get('dtype')!r}; allowed: {', '.join(DTYPES)}")
    if not meta.get("complete", False):
        raise DataError(f"{path}: preparation did not finish; run `sparsetrain data prepare` again to resume it")
    return meta


@dataclass
class ShardSet:
    """The token arrays of one corpus directory, memory-mapped, per split (val may be empty)."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    train_files: list[Path] = field(default_factory=list)
    val_files: list[Path] = field(default_factory=list)


def _open_checked(path: Path, dtype: str, tokens: int | None) -> np.ndarray:
    """Memory-map one shard after checking its byte size (against meta when known)."""
    if not path.exists():
        raise DataError(f"data.corpus: missing shard {path}")
    size, item = path.stat().st_size, DTYPES[dtype].itemsize
    if tokens is not None and size != tokens * item:
        raise DataError(f"data.corpus: shard {path} has {size} bytes but {META} records {tokens} {dtype} tokens "
                        f"({tokens * item} bytes): truncated or corrupt; re-run `sparsetrain data prepare`")
    if size % item:
        raise DataError(f"data.corpus: {path} has a byte size ({size}) that is not a multiple of {item}; "
                        f"expected {dtype} tokens")
    if size == 0:
        raise DataError(f"data.corpus: {path} is empty")
    return np.memmap(path, dtype=DTYPES[dtype], mode="r")


def open_shard_dir(root: str | Path) -> ShardSet:
    """Open a prepared shard directory (meta.json) or a nanoGPT directory (train.bin, val.bin; uint16)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.corpus: directory not found: {root} (expected {META} and token shards from "
                        f"`sparsetrain data prepare`, nanoGPT train.bin/val.bin, or corpus 'stdlib')")
    if (root / META).exists():
        meta = read_meta(root)
        out = ShardSet([], [], meta)
        for split in SPLITS:
            for entry in meta.get("shards", {}).get(split, []):
                path = root / entry["file"]
                if not path.resolve().is_relative_to(root.resolve()):  # meta.json names files of its corpus only
                    raise DataError(f"data.corpus: {root / META} lists shard {entry['file']!r} outside {root}")
                getattr(out, split).append(_open_checked(path, meta["dtype"], int(entry["tokens"])))
                getattr(out, f"{split}_files").append(path)
        if not out.train:
            raise DataError(f"data.corpus: {root / META} lists no train shards")
        return out
    if (root / PREPARE_STATE).exists():
        raise DataError(f"data.corpus: {root}: preparation did not finish; run `sparsetrain data prepare` "
                        f"again to resume it")
    if not (root / "train.bin").exists():
        raise DataError(f"data.corpus: missing {root / 'train.bin'} (nanoGPT uint16 token file) and no {META} "
                        f"(from `sparsetrain data prepare`) in {root}")
    out = ShardSet([_open_checked(root / "train.bin", "uint16", None)], [], {},
                   train_files=[root / "train.bin"])
    if (root / "val.bin").exists():
        out.val, out.val_files = [_open_checked(root / "val.bin", "uint16", None)], [root / "val.bin"]
    return out
