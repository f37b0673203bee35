"""Reading DCP checkpoints without running code: `.metadata` through an allow-listed unpickler.

torch's `FileSystemReader.read_metadata` unpickles `.metadata` with plain `pickle.load` (torch 2.13;
pytorch/pytorch#189308), so a crafted file runs code as soon as `dcp.load` opens it. `VerifiedReader`
replaces that one read: the bytes are checked against the SHA-256 the manifest recorded, then unpickled
by `MetadataUnpickler`, which resolves only the classes DCP's metadata is made of (dataclasses from
torch.distributed.checkpoint, torch.Size, dtypes, layouts, paths) and refuses any other global, so a
`__reduce__` payload cannot reach `os.system` or `builtins.eval`. Tensor data is read by torch with
`torch.load(..., weights_only=True)`; a byte item (`BytesStorageMetadata`), which DCP would read with
`torch.load(..., weights_only=False)`, is refused: sparsetrain checkpoints hold tensors only. The reader also
drops DCP's fallback to per-rank `__<rank>.metadata` files (its `read_metadata` takes no kwargs), so only the
verified global file is ever parsed.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from sparsetrain.train.location import Location, RemotePath
from sparsetrain.train.manifest import METADATA, CheckpointError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP_METADATA, "Metadata"), (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"), (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "ChunkStorageMetadata"), (_DCP_METADATA, "MetadataIndex"), (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    *((m, c) for m in ("pathlib", "pathlib._local") for c in ("PosixPath", "WindowsPath", "PurePosixPath",
                                                              "PureWindowsPath")),
}


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only the globals DCP metadata is built from."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def load_metadata(data: bytes, where: str) -> Metadata:
    """Unpickle DCP metadata bytes with the allow-list; CheckpointError (naming `where`) on anything else."""
    try:
        metadata = MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any failure to parse is a refused checkpoint
        raise CheckpointError(f"{where}: refused: {type(e).__name__}: {e}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{where}: refused: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class _Verified:
    """The `.metadata` read shared by the local and the fsspec reader (mixed in before the DCP reader)."""

    metadata_sha256: str
    listed: set[str]
    where: str

    def _verify(self, manifest: dict, where: str) -> None:
        self.metadata_sha256 = manifest["files"][METADATA]["sha256"]
        self.listed, self.where = set(manifest["files"]), where

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never falls back to per-rank metadata files
        with self.fs.create_stream(self.fs.concat_path(self.path, METADATA), "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != self.metadata_sha256:
            raise CheckpointError(f"checkpoint {self.where}: file {METADATA} fails its SHA-256 check")
        metadata = load_metadata(data, f"checkpoint {self.where}: file {METADATA}")
        pickled = [k for k, v in (metadata.state_dict_metadata or {}).items() if not isinstance(v, TensorStorageMetadata)]
        if pickled:  # DCP reads such an item with torch.load(weights_only=False): code would run
            raise CheckpointError(f"checkpoint {self.where}: file {METADATA} declares {len(pickled)} non-tensor "
                                  f"item(s) ({pickled[0]!r}...), which DCP would unpickle unchecked; sparsetrain "
                                  "checkpoints hold tensors only: refused")
        for info in (metadata.storage_data or {}).values():
            name = getattr(info, "relative_path", None)
            if name not in self.listed:
                raise CheckpointError(f"checkpoint {self.where}: file {METADATA} points at {name!r}, "
                                      f"which manifest.json does not list")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class VerifiedReader(_Verified, FileSystemReader):
    """FileSystemReader whose `.metadata` must match the manifest's SHA-256 and is unpickled safely; the
    data files it points at must be files the manifest lists (no path outside the checkpoint)."""

    def __init__(self, path: str | Path, manifest: dict) -> None:
        super().__init__(path)
        self._verify(manifest, str(path))


class VerifiedFsspecReader(_Verified, FsspecReader):
    """The same checks over an fsspec URL (DCP's FsspecReader: s3://, gs://, file://, memory://)."""

    def __init__(self, url: str, manifest: dict) -> None:
        super().__init__(url)
        self._verify(manifest, url)


def verified_reader(path: Location, manifest: dict) -> FileSystemReader:
    """The verified DCP reader for a local checkpoint directory or one behind a URL."""
    if isinstance(path, RemotePath):
        return VerifiedFsspecReader(str(path), manifest)
    return VerifiedReader(path, manifest)


def writer(path: Location) -> FileSystemWriter:
    """DCP's writer for a local directory or a URL (FsspecWriter)."""
    if isinstance(path, RemotePath):
        return FsspecWriter(str(path))
    return FileSystemWriter(str(path))
