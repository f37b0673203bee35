"""Strict reads of user text files: UTF-8 that names the bad byte, YAML that refuses duplicate keys.

Light on purpose (only PyYAML): imported by the config, data, sim and launcher readers alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(ValueError):
    """A YAML mapping names the same key twice; the message is one line naming source, key and line."""


def decode_utf8(raw: bytes, head: str, error: type[Exception], line: int | None = None, tail: str = "") -> str:
    """`raw` as strict UTF-8, else error(f"{head} (byte 0x.. at offset N){tail}") in one line; with `line` (raw is
    that line of a file) "(line L: byte 0x.. at offset N of the line)"."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where, of = (f"line {line}: ", " of the line") if line is not None else ("", "")
        raise error(f"{head} ({where}byte 0x{raw[e.start]:02x} at offset {e.start}{of}){tail}") from None


def read_utf8(path: str | Path, head: str, error: type[Exception]) -> str:
    """The text of `path` as strict UTF-8 (see decode_utf8); OSError passes through for the caller to word."""
    return decode_utf8(Path(path).read_bytes(), head, error)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping naming a key twice (PyYAML keeps the last one silently)."""

    source = "<yaml>"

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:  # `<<: *base` then overriding a merged key is legitimate
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                except TypeError:  # unhashable key: the base class reports it
                    continue
                if dup:
                    line = key_node.start_mark.line + 1
                    raise DuplicateKeyError(f"{self.source}: duplicate key {key!r} (line {line})")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def load_yaml(text: str, source: str) -> Any:
    """safe_load of `text`, refusing duplicate mapping keys (DuplicateKeyError naming `source`, the key, its line).

    Other YAML errors are raised as yaml.YAMLError, as yaml.safe_load does.
    """
    loader = _StrictLoader(text)
    loader.source = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
