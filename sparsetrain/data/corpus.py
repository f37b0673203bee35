"""Token corpora: the embedded Python-stdlib byte corpus, or a directory of token shards (see shards.py)."""
from __future__ import annotations

import hashlib
import os
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from sparsetrain.data.errors import DataError
from sparsetrain.data.shards import ShardSet, open_shard_dir

STDLIB_MAX_BYTES = 24 << 20  # cap on the embedded corpus (train + val), bytes


def _cache_dir() -> Path:
    root = os.environ.get("SPARSETRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparsetrain")
    return Path(root)


def stdlib_files() -> list[Path]:
    """The standard library's own .py sources, sorted (present wherever Python is)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts[-3:-1])
    if not files:
        raise DataError(f"no .py files found under the standard library at {root}")
    return files


def is_val_key(rel: str, val_fraction: float) -> bool:
    """Deterministic split by file: crc32 of the relative path."""
    return (zlib.crc32(rel.encode()) % 10_000) < val_fraction * 10_000


def build_stdlib_corpus(val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level (vocab 256) train/val arrays from stdlib sources, cached on disk."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    key = hashlib.sha1(f"{root}|{len(files)}|{val_fraction}|{STDLIB_MAX_BYTES}".encode()).hexdigest()[:12]
    cache = _cache_dir() / f"stdlib-{key}"
    tr, va = cache / "train.u8", cache / "val.u8"
    if tr.exists() and va.exists():
        return np.fromfile(tr, dtype=np.uint8), np.fromfile(va, dtype=np.uint8)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    total = 0
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            continue
        rel = str(f.relative_to(root))
        parts[is_val_key(rel, val_fraction)].append(data)
        total += len(data)
        if total >= STDLIB_MAX_BYTES:
            break
    train = np.frombuffer(b"".join(parts[False]), dtype=np.uint8)
    val = np.frombuffer(b"".join(parts[True]), dtype=np.uint8)
    if len(val) == 0 or len(train) == 0:
        raise DataError(f"stdlib corpus split produced an empty part (train {len(train)}, val {len(val)} bytes)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    train.tofile(tmp / "train.u8")
    val.tofile(tmp / "val.u8")
    os.replace(tmp / "train.u8", tr)
    os.replace(tmp / "val.u8", va)
    tmp.rmdir()
    return train, val


def load_corpus(corpus: str, val_fraction: float) -> ShardSet:
    """Resolve `data.corpus` to its token arrays: the embedded stdlib bytes or a shard directory."""
    if corpus == "stdlib":
        train, val = build_stdlib_corpus(val_fraction)
        return ShardSet([train], [val], {"tokenizer": {"kind": "byte", "name": "byte", "vocab_size": 256}})
    return open_shard_dir(corpus)
