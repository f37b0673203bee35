"""Entry point for torchrun: `torchrun --nproc-per-node N -m sparsetrain.launcher.torchrun_entry --config X`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; this module loads the config (with `--set a.b=v` overrides), turns
off the progress bar on ranks other than 0, prefixes every line the rank prints
with `(rank N) ` (as the Ray launcher does), and calls the worker entry. Works
for multi-node torchrun too (`--nnodes`, `--rdzv-endpoint`), no Ray needed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from sparsetrain.launcher.env import PROGRESS_ENV, PrefixedStream

DEFAULT_ENTRY = "sparsetrain.train.entry:train_worker"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of the torchrun entry."""
    p = argparse.ArgumentParser(prog="python -m sparsetrain.launcher.torchrun_entry", description=__doc__)
    p.add_argument("--config", default="tiny", help="preset name or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable")
    p.add_argument("--entry", default=DEFAULT_ENTRY, help="worker function as module:function")
    p.add_argument("--summary-out", default="", help="rank 0 writes the run summary here as JSON; "
                   "a failing rank writes its traceback to <summary-out>.rank<R>.err")
    p.add_argument("--no-rank-prefix", dest="rank_prefix", action="store_false",
                   help="print worker output as is (default: every line starts with '(rank N) ')")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one rank under torchrun; returns the process exit code."""
    args = parse_args(argv)
    from sparsetrain.launcher.errors import one_line, user_error_types
    from sparsetrain.launcher.ray_runtime import load_entry

    from sparsetrain.config import load_config, to_dict

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        print(f"torchrun_entry: {', '.join(missing)} not set; start it with torchrun", file=sys.stderr)
        return 2
    rank = int(os.environ["RANK"])
    if rank != 0:
        os.environ[PROGRESS_ENV] = "0"
    streams = (sys.stdout, sys.stderr)
    if args.rank_prefix:
        sys.stdout, sys.stderr = PrefixedStream(sys.stdout, rank), PrefixedStream(sys.stderr, rank)
    try:
        cfg = load_config(args.config, args.overrides)
        summary = load_entry(args.entry)(to_dict(cfg))
    except user_error_types() as e:  # bad input: one line, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr)
        if args.summary_out:
            Path(f"{args.summary_out}.rank{rank}.err").write_text(one_line(e))
        return 1
    except BaseException:
        if args.summary_out:
            Path(f"{args.summary_out}.rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        for s in (sys.stdout, sys.stderr):
            if isinstance(s, PrefixedStream):
                s.close_rest()
        sys.stdout, sys.stderr = streams
    if rank == 0 and args.summary_out:
        Path(args.summary_out).write_text(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    code = main()
    # The run is over and its process groups are destroyed: leave without interpreter
    # finalization, where C++ objects still reachable from Python (gloo pairs, autograd
    # hooks) can abort the process and turn a finished run into a torchrun failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
