"""Where a run's outputs go on a cluster: train.out_dir / checkpoint.dir must outlive the job.

A Ray job runs in a temporary working directory that Ray deletes with the job (KubeRay: a pod's file
system, deleted with the pod), so a relative out_dir there loses every checkpoint and a resubmitted job
cannot resume. For a submitted job (`sparsetrain submit`, or `sparsetrain train` running as a Ray job's
entrypoint) a relative path is resolved against SPARSETRAIN_STORAGE_ROOT (a directory every node sees:
NFS/Lustre/EFS, a mounted bucket, or an fsspec URL such as s3://bucket/runs) or refused with one line.
Absolute paths and fsspec URLs (s3://, gs://, file://; never relative) are used as given.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import TYPE_CHECKING

from sparsetrain.config import ConfigError
from sparsetrain.train.location import is_url, join

if TYPE_CHECKING:
    from sparsetrain.config import Config

STORAGE_ROOT_ENV = "SPARSETRAIN_STORAGE_ROOT"
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor on every job's entrypoint process


def in_ray_job(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a Ray job's entrypoint (submitted job, KubeRay RayJob)."""
    return RAY_JOB_ENV in (os.environ if environ is None else environ)


def resolve_job_storage(cfg: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """Make train.out_dir and checkpoint.dir absolute for a cluster job (in place); returns 'key: old -> new'.

    A relative path joins SPARSETRAIN_STORAGE_ROOT; without it, ConfigError naming the key and the fix. A relative
    data.corpus (not the embedded stdlib corpus) is refused: it is read where the shards were prepared, not
    stored under the storage root."""
    env = os.environ if environ is None else environ
    root = env.get(STORAGE_ROOT_ENV, "")
    if root and not posixpath.isabs(root) and not is_url(root):
        raise ConfigError(f"{STORAGE_ROOT_ENV}={root!r} must be an absolute path on storage every node sees, "
                          f"or an fsspec URL (s3://bucket/prefix)")
    changes = []
    for section, key in ((cfg.train, "out_dir"), (cfg.checkpoint, "dir")):
        path = getattr(section, key)
        name = f"{'train' if section is cfg.train else 'checkpoint'}.{key}"
        if not path or posixpath.isabs(path) or is_url(path):
            continue
        if not root:
            raise ConfigError(f"{name}={path!r} is relative: a Ray job runs in a temporary directory that is "
                              f"deleted with it (checkpoints lost, no resume); give an absolute path on storage "
                              f"every node sees or an fsspec URL (s3://...), or set {STORAGE_ROOT_ENV}")
        new = join(root, path)
        setattr(section, key, new)
        changes.append(f"{name}: {path} -> {new}")
    corpus = cfg.data.corpus
    if corpus != "stdlib" and not posixpath.isabs(corpus) and not is_url(corpus):
        raise ConfigError(f"data.corpus={corpus!r} is relative: a Ray job runs in a temporary directory holding "
                          f"the code and configs only; give the absolute path where every node sees the prepared "
                          f"shards (e.g. --set data.corpus=/shared/data/{posixpath.basename(corpus.rstrip('/'))})")
    return changes
