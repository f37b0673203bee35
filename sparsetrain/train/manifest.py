"""Checkpoint manifests: the SHA-256 of every file, written at commit time, verified before anything is read.

A checkpoint directory is trusted only as far as its `manifest.json` vouches for it: every file the
checkpoint needs is listed with its size and SHA-256, and `verify_checkpoint` checks all of them before
any byte of the checkpoint is parsed. The manifest guards integrity (torn, truncated, flipped or deleted
files); that the DCP `.metadata` can never run code is guarded separately by the restricted unpickler in
`sparsetrain.train.safe_dcp`. Hashing is split over the ranks when a process group is up.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch.distributed as dist

from sparsetrain.train.location import Location, as_location

MANIFEST = "manifest.json"
FORMAT = "sparsetrain-checkpoint/1"
METADATA = ".metadata"  # DCP's global metadata file (a pickle, read only through safe_dcp)
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sha256_file(path: str | Location) -> str:
    """Hex SHA-256 of a file (local or behind a URL), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with as_location(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _gather(local: Any, collective: bool, group: Any = None) -> list[Any]:
    """Every rank's `local` (rank order); just [local] without a process group."""
    world = _world()[1]
    if not collective or world == 1:
        return [local]
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local, group=group)
    return parts


def write_manifest(directory: Location, step: int, group: Any = None) -> dict[str, Any]:
    """Hash every file in `directory` (split over ranks) and write the manifest on rank 0. Collective (over
    `group`, a process group spanning every rank; default: the world)."""
    rank, world = _world()
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST) if rank == 0 else []
    if world > 1:  # rank 0's listing for all: a shared filesystem's caches may lag on other nodes
        box = [names]
        dist.broadcast_object_list(box, src=0, group=group)
        names = box[0]
    mine = {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size}
            for n in names[rank::world]}
    files: dict[str, Any] = {}
    for part in _gather(mine, collective=True, group=group):
        files.update(part)
    manifest = {"format": FORMAT, "step": step, "files": dict(sorted(files.items()))}
    if rank == 0:
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(directory: Location) -> dict[str, Any]:
    """The parsed manifest of a checkpoint directory, its shape checked; CheckpointError if absent or malformed."""
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {MANIFEST}: not committed by this sparsetrain "
                              f"or copied without it; refusing to read it (docs/reliability.md, trust model)")
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} is unreadable: {e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} is not a {FORMAT} manifest")
    for name, entry in files.items():
        if not name or "/" in name or "\\" in name or name in (".", "..") or not isinstance(entry, dict) \
                or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("bytes"), int):
            raise CheckpointError(f"checkpoint {directory}: {MANIFEST} has a malformed entry {name!r}")
    if METADATA not in files:
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} does not list {METADATA}")
    name = directory.name
    if name.startswith("step_") and name[5:].isdigit() and manifest.get("step") != int(name[5:]):
        step = manifest.get("step")
        shown = step if isinstance(step, int) and not isinstance(step, bool) else f"{step!r} (not an integer)"
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST} records step {shown}, the directory "
                              f"name step {int(name[5:])} (renamed or copied over?); refusing to resume from it")
    return manifest


def check_file(directory: Location, name: str, entry: dict[str, Any], hashes: bool = True) -> str | None:
    """None when the file matches its manifest entry (size, and SHA-256 with `hashes`), else a one-line reason
    naming the file."""
    path = directory / name
    if not path.is_file():
        return f"checkpoint {directory}: file {name} is missing (listed in {MANIFEST})"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return (f"checkpoint {directory}: file {name} has {size} bytes, {MANIFEST} says {entry['bytes']} "
                f"(truncated or replaced)")
    if hashes and sha256_file(path) != entry["sha256"]:
        return f"checkpoint {directory}: file {name} fails its SHA-256 check (corrupt or modified since written)"
    return None


def verify_checkpoint(directory: str | Location, required: tuple[str, ...] = (), collective: bool = True,
                      hashes: bool = True) -> dict:
    """Check every file against the manifest before anything is parsed; returns the manifest.

    Raises CheckpointError naming the first bad file. With `collective` and a process group up, every
    rank must call it: the files are hashed round-robin over the ranks and all ranks get the same verdict.
    `hashes=False` checks presence and sizes only (a cheap look before anything starts, not a verification).
    """
    directory = as_location(directory)
    rank, world = _world()
    collective = collective and world > 1
    problems: list[str] = []
    manifest: dict[str, Any] = {}
    try:
        manifest = read_manifest(directory)
        missing = [n for n in required if n not in manifest["files"]]
        if missing:
            problems.append(f"checkpoint {directory}: {MANIFEST} does not list {', '.join(missing)}")
    except CheckpointError as e:
        problems.append(str(e))
    if not problems:
        names = sorted(manifest["files"])
        for name in names[rank::world] if collective else names:
            reason = check_file(directory, name, manifest["files"][name], hashes)
            if reason:
                problems.append(reason)
                break
    found = [p for part in _gather(problems, collective) for p in part]
    if found:
        raise CheckpointError(found[0])
    return manifest
