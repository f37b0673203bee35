"""Launching training: local Ray runtimes, Ray cluster jobs, torchrun, inline.

Import-light on purpose: ray and torch are imported inside the functions that
need them. The CLI calls `run_job(cfg)` and mounts `jobs.jobs_app` / `jobs.submit_command`.
"""
from sparsetrain.launcher.errors import LaunchError
from sparsetrain.launcher.run import run_job

__all__ = ["LaunchError", "run_job"]
