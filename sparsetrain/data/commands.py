"""`sparsetrain data prepare | train-tokenizer | info`: read the preset's `data` section; flags override it."""
from __future__ import annotations

import json

import typer

data_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                       help="Prepare token shards from local corpora; train a BPE tokenizer.")

_ConfigOpt = typer.Option("tiny", "--config", "-c", help="YAML preset path or name under configs/")
_SetOpt = typer.Option(None, "--set", "-s", help="override, e.g. --set data.shard_tokens=1000000 (repeatable)")


def _cfg(config: str, overrides: list[str] | None, **data: object):
    """The preset with --set overrides, then the command's flags as data.* overrides."""
    from sparsetrain.cli import _load

    extra = [f"data.{k}={v}" for k, v in data.items() if v is not None]
    return _load(config, (overrides or []) + extra)


def _run(fn, *args, **kwargs):
    from sparsetrain.cli import _fail
    from sparsetrain.config import ConfigError
    from sparsetrain.data.errors import DataError

    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        _fail("interrupted (run the same command again to resume)", 130)
    except (DataError, ConfigError) as e:
        _fail(str(e), 1)


@data_app.command("prepare")
def prepare_command(config: str = _ConfigOpt, overrides: list[str] | None = _SetOpt,
                    source: str | None = typer.Option(None, help="input (default data.source): stdlib, a file, "
                                                      "directory or glob of .txt/.jsonl/.parquet, hf:<dataset>"),
                    out: str | None = typer.Option(None, help="output directory (default data.corpus)"),
                    tokenizer: str | None = typer.Option(None, help="byte | tokenizer.json | hf:<name> | "
                                                         "tiktoken:<enc> (default data.tokenizer)"),
                    text_field: str | None = typer.Option(None, help="JSONL key / Parquet or dataset column"),
                    workers: int = typer.Option(0, help="tokenizer processes (default data.prepare_workers, "
                                                "0 = one per CPU)"),
                    overwrite: bool = typer.Option(False, help="replace a corpus prepared from other inputs"),
                    progress: bool = typer.Option(True, help="progress bar")) -> None:
    """Tokenize a corpus into train/val token shards + meta.json (idempotent, resumable)."""
    cfg = _cfg(config, overrides, source=source, tokenizer=tokenizer, text_field=text_field)
    from sparsetrain.data.prepare import prepare

    _run(prepare, cfg, out=out, workers=workers or None, overwrite=overwrite, progress=progress,
         log=lambda m: typer.echo(m, err=True))


@data_app.command("train-tokenizer")
def train_tokenizer_command(config: str = _ConfigOpt, overrides: list[str] | None = _SetOpt,
                            source: str | None = typer.Option(None, help="input (default data.source)"),
                            out: str | None = typer.Option(None, help="tokenizer.json to write "
                                                           "(default data.tokenizer)"),
                            vocab_size: int = typer.Option(0, help="vocabulary size (default model.vocab_size)"),
                            min_frequency: int = typer.Option(2, help="merge pairs seen at least this often"),
                            overwrite: bool = typer.Option(False, help="train again over an existing file"),
                            progress: bool = typer.Option(True, help="progress bar")) -> None:
    """Train a byte-level BPE tokenizer on local files (offline)."""
    cfg = _cfg(config, overrides, source=source)
    from sparsetrain.data.train_tokenizer import train_bpe

    _run(train_bpe, cfg, out=out, vocab_size=vocab_size or None, min_frequency=min_frequency,
         overwrite=overwrite, progress=progress, log=lambda m: typer.echo(m, err=True))


@data_app.command("info")
def info_command(config: str = _ConfigOpt, overrides: list[str] | None = _SetOpt) -> None:
    """Check the run's data as `train` would (shards, tokenizer, vocab) and print a summary as JSON."""
    cfg = _cfg(config, overrides)
    from sparsetrain.data.check import check_data

    typer.echo(json.dumps(_run(check_data, cfg), indent=1))
