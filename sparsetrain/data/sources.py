"""Text sources for `data prepare` / `train-tokenizer`: stdlib, text files, JSONL, Parquet, Hugging Face datasets.

Every source yields documents `(key, text)` in a fixed order, streaming (never the whole corpus in
memory). The key decides the train/val split (crc32 of it, as for the stdlib corpus): a file's path
for text files (split by file), `path:line` / `path:row` for JSONL and Parquet, the row index for
datasets (split by document).
"""
from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsetrain.config import DataConfig
from sparsetrain.data.corpus import STDLIB_MAX_BYTES, stdlib_files
from sparsetrain.data.errors import DataError
from sparsetrain.textio import decode_utf8

FORMATS = ("text", "jsonl", "parquet", "hf", "stdlib")
_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def _utf8(raw: bytes, f: Path, line: int | None = None) -> str:
    """Strict UTF-8 decode of a text/JSONL source's bytes; a binary file is refused in one line naming it."""
    return decode_utf8(raw, f"data.source: {f} is not UTF-8 text", DataError, line,
                       "; text and JSONL sources must be UTF-8 (a binary file? point data.source at the text files "
                       "only)")


@dataclass
class Source:
    """A resolved `data.source`: what to read and how."""

    spec: str
    format: str
    text_field: str = "text"
    files: list[Path] = field(default_factory=list)
    root: Path | None = None
    hf_config: str = ""
    hf_split: str = "train"

    @property
    def total(self) -> int | None:
        """Number of documents when known without reading them (files, Parquet rows)."""
        if self.format in ("text", "stdlib"):
            return len(self.files)
        if self.format == "parquet":
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)
        return None

    def fingerprint(self) -> str:
        """Changes when the input changes: spec, format, field, and each file's name, size and mtime."""
        h = hashlib.sha256(json.dumps([self.spec, self.format, self.text_field, self.hf_config,
                                       self.hf_split]).encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"spec": self.spec, "format": self.format, "files": len(self.files)}
        if self.format in ("jsonl", "parquet", "hf"):
            out["text_field"] = self.text_field
        if self.format == "hf":
            out.update(config=self.hf_config, split=self.hf_split)
        return out

    def _rel(self, f: Path) -> str:
        return str(f.relative_to(self.root)) if self.root and f.is_relative_to(self.root) else str(f)

    def documents(self) -> Iterator[tuple[str, str]]:
        """(key, text) for every document, in a fixed order."""
        if self.format in ("text", "stdlib"):
            for f in self.files:
                try:
                    raw = f.read_bytes()
                except OSError as e:
                    raise DataError(f"data.source: cannot read {f}: {e.strerror}") from None
                # the stdlib's own sources are taken as they are; a user's text file must be UTF-8 text
                yield self._rel(f), raw.decode("utf-8", errors="replace") if self.format == "stdlib" else _utf8(raw, f)
        elif self.format == "jsonl":
            yield from self._jsonl()
        elif self.format == "parquet":
            yield from self._parquet()
        else:
            yield from self._hf()

    def _jsonl(self) -> Iterator[tuple[str, str]]:
        for f in self.files:
            rel = self._rel(f)
            with f.open("rb") as fh:
                for n, raw in enumerate(fh, 1):
                    line = _utf8(raw, f, n)
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f}:{n}: not valid JSON ({e.msg})") from None
                    if not isinstance(row, dict) or self.text_field not in row:
                        keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                        raise DataError(f"{f}:{n}: no field {self.text_field!r} (data.text_field; found: {keys})")
                    if row[self.text_field] is not None:
                        yield f"{rel}:{n}", str(row[self.text_field])

    def _parquet(self) -> Iterator[tuple[str, str]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError("Parquet sources need pyarrow: pip install 'sparsetrain[data]'") from None
        for f in self.files:
            pf, rel, row = pq.ParquetFile(f), self._rel(f), 0
            names = pf.schema_arrow.names
            if self.text_field not in names:
                raise DataError(f"{f}: no column {self.text_field!r} (data.text_field; columns: {', '.join(names)})")
            for batch in pf.iter_batches(batch_size=1024, columns=[self.text_field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if text is not None:
                        yield f"{rel}:{row}", str(text)

    def _hf(self) -> Iterator[tuple[str, str]]:
        try:
            import datasets
        except ImportError:
            raise DataError(f"data.source={self.spec!r} needs the Hugging Face `datasets` package "
                            f"(pip install datasets)") from None
        name = self.spec[3:]
        local = Path(name)
        try:
            if (local / "dataset_info.json").exists() and (local / "state.json").exists():  # save_to_disk output
                ds = datasets.load_from_disk(str(local))  # memory-mapped Arrow, not loaded into memory
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[self.hf_split]
            else:
                ds = datasets.load_dataset(name, self.hf_config or None, split=self.hf_split, streaming=True)
        except Exception as e:  # noqa: BLE001 - datasets raises many types (files, network, split)
            raise DataError(f"data.source={self.spec!r}: cannot open the dataset: {str(e).splitlines()[0][:200]}") \
                from None
        for i, row in enumerate(ds):
            if self.text_field not in row:
                raise DataError(f"data.source={self.spec!r}: no column {self.text_field!r} "
                                f"(data.text_field; columns: {', '.join(sorted(row))})")
            if row[self.text_field] is not None:
                yield str(i), str(row[self.text_field])


def _stdlib_source() -> Source:
    """The same stdlib .py files (and size cap) as the embedded byte corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in stdlib_files():
        files.append(f)
        total += f.stat().st_size
        if total >= STDLIB_MAX_BYTES:
            break
    return Source("stdlib", "stdlib", files=files, root=root)


def _expand(spec: str) -> tuple[list[Path], Path]:
    """Files named by a file path, a directory (recursive) or a glob; and the root keys are relative to."""
    p = Path(spec)
    if p.is_file():
        return [p], p.parent
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return files, p
    files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).is_file())
    fixed = list(p.parts[:-1])
    for i, part in enumerate(fixed):
        if glob.has_magic(part):
            fixed = fixed[:i]
            break
    return files, Path(*fixed) if fixed else Path(".")


def resolve_source(d: DataConfig) -> Source:
    """The documents `data.source` names, with its format (`data.source_format`, or from file extensions)."""
    spec, fmt = d.source, d.source_format
    if spec == "stdlib":
        return _stdlib_source()
    if spec.startswith("hf:") or fmt == "hf":
        return Source(spec if spec.startswith("hf:") else f"hf:{spec}", "hf", d.text_field,
                      hf_config=d.hf_config, hf_split=d.hf_split)
    files, root = _expand(spec)
    if not files:
        raise DataError(f"data.source={spec!r}: no files found (a file, a directory, a glob, 'stdlib' or "
                        f"hf:<dataset>)")
    if fmt == "auto":
        kinds = {_EXT.get(f.suffix.lower(), "text") for f in files}
        if len(kinds) > 1:
            raise DataError(f"data.source={spec!r} mixes formats ({', '.join(sorted(kinds))}); set "
                            f"data.source_format or point at one kind of file")
        fmt = kinds.pop()
    return Source(spec, fmt, d.text_field, files=files, root=root)
