"""Where a run writes: a local directory, or an fsspec URL (`s3://`, `gs://`, `file://`, `memory://`).

Local paths stay `pathlib.Path` (the code paths every test exercises). A URL becomes a `RemotePath`: the
few `Path` operations checkpoints use (join, name, exists, is_file, is_dir, iterdir, glob, stat, open,
read/write), implemented over the URL's fsspec filesystem. `s3://` needs s3fs (`pip install
'sparsetrain[s3]'`), `gs://` gcsfs (`[gcs]`); a missing one is one line naming the extra, before any
process starts. Run logs (metrics.jsonl, expert_loads.jsonl, placements.jsonl, config.yaml, summary.json,
TensorBoard files stay local), the heartbeat
and the run lock need appends and atomic creates that object stores lack: for a URL `train.out_dir` they
are written to a local mirror (`local_dir`) and uploaded to the URL at every checkpoint commit and at the
end of the run (`upload_logs`); a resumed run on a fresh node downloads them back (`download_logs`).
"""
from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

from sparsetrain.config import ConfigError

EXTRA_FOR = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # protocol -> pip extra that provides it
LOCAL_ENV = "SPARSETRAIN_LOCAL_DIR"  # where a URL out_dir's logs are mirrored (default: <tmp>/sparsetrain-runs)
LOGS = ("metrics.jsonl", "expert_loads.jsonl", "placements.jsonl", "config.yaml", "summary.json")


def is_url(where: str | os.PathLike | None) -> bool:
    """Whether `where` names an fsspec URL (`proto://...`) rather than a local path."""
    return isinstance(where, RemotePath) or (isinstance(where, str) and "://" in where)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; ConfigError in one line naming the extra to install."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        extra = EXTRA_FOR.get(protocol)
        hint = f"pip install 'sparsetrain[{extra}]'" if extra else "install the fsspec implementation for it"
        raise ConfigError(f"{url}: the {protocol}:// filesystem is not installed; {hint}") from None
    except ValueError as e:
        raise ConfigError(f"{url}: not a usable fsspec URL: {e}") from None


class RemotePath:
    """A file or directory behind an fsspec URL, with the subset of `pathlib.Path` checkpoints use."""

    def __init__(self, url: str, fs: Any = None, path: str | None = None) -> None:
        if fs is None:
            fs, path = filesystem(url)
        self.url, self.fs, self.path = url.rstrip("/"), fs, (path or "").rstrip("/")

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}", self.fs, posixpath.join(self.path, str(name)))

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.url.rsplit("/", 1)[0], self.fs, posixpath.dirname(self.path))

    def _child(self, full: str) -> RemotePath:
        return self / posixpath.basename(full.rstrip("/"))

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def iterdir(self) -> list[RemotePath]:
        self.fs.invalidate_cache(self.path)  # other ranks / processes wrote here since any cached listing
        return [self._child(p) for p in self.fs.ls(self.path, detail=False) if p.rstrip("/") != self.path]

    def glob(self, pattern: str) -> list[RemotePath]:
        self.fs.invalidate_cache(self.path)
        return [self._child(p) for p in self.fs.glob(posixpath.join(self.path, pattern))]

    def stat(self) -> SimpleNamespace:
        """st_size, and st_mtime where the store records one (0.0 otherwise: never newer than anything)."""
        info = self.fs.info(self.path)
        mtime = next((info[k] for k in ("mtime", "LastModified", "updated", "created") if info.get(k)), 0.0)
        if isinstance(mtime, str):
            try:
                mtime = datetime.fromisoformat(mtime.replace("Z", "+00:00"))
            except ValueError:
                mtime = 0.0
        mtime = mtime.timestamp() if isinstance(mtime, datetime) else float(mtime)
        return SimpleNamespace(st_size=int(info.get("size") or 0), st_mtime=mtime)

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        self.fs.makedirs(self.path, exist_ok=True)

    def open(self, mode: str = "rb") -> IO[Any]:
        return self.fs.open(self.path, mode)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.path, bytes(data))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


Location = Path | RemotePath


def as_location(where: str | os.PathLike | RemotePath) -> Location:
    """A local Path, or a RemotePath for an fsspec URL."""
    if isinstance(where, (Path, RemotePath)):
        return where
    return RemotePath(where) if is_url(where) else Path(where)


def join(where: str, name: str) -> str:
    """`where/name` for a path or a URL (as a string)."""
    return f"{where.rstrip('/')}/{name}" if is_url(where) else str(Path(where) / name)


def rmtree(where: Location) -> None:
    """Remove a directory tree; nothing when it is absent."""
    if isinstance(where, RemotePath):
        try:
            where.fs.rm(where.path, recursive=True)
        except FileNotFoundError:
            pass
        where.fs.invalidate_cache(where.path)
    else:
        shutil.rmtree(where, ignore_errors=True)


def local_dir(out_dir: str) -> Path:
    """Where a run's logs, heartbeat and lock live: out_dir itself, or for a URL its local mirror
    (`$SPARSETRAIN_LOCAL_DIR/<protocol>/<path>`, default under the temp dir; the same for the same URL)."""
    if not is_url(out_dir):
        return Path(out_dir)
    protocol, rest = out_dir.split("://", 1)
    base = Path(os.environ.get(LOCAL_ENV) or Path(tempfile.gettempdir()) / "sparsetrain-runs")
    return base / protocol / "/".join(p for p in rest.strip("/").split("/") if p not in ("", ".", ".."))


def upload_logs(out_dir: str) -> None:
    """Copy the run logs from the local mirror to a URL out_dir (nothing for a local out_dir)."""
    if not is_url(out_dir):
        return
    src, dst = local_dir(out_dir), RemotePath(out_dir)
    dst.mkdir()
    for name in LOGS:
        if (src / name).is_file():
            dst.fs.put_file(str(src / name), (dst / name).path)


def download_logs(out_dir: str) -> None:
    """Fetch the run logs of a URL out_dir into an empty local mirror (a resumed run on a fresh node)."""
    if not is_url(out_dir):
        return
    src, dst = RemotePath(out_dir), local_dir(out_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in LOGS:
        if not (dst / name).exists() and (src / name).is_file():
            src.fs.get_file((src / name).path, str(dst / name))


def check_urls(*where: str) -> None:
    """Fail in one line before anything starts when a URL's filesystem is not installed or unusable."""
    for w in where:
        if is_url(w):
            filesystem(w)
