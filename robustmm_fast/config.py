"""Method configs from files and the command line: a TOML or JSON file of hyperparameters,
then `key=value` overrides (values parsed as JSON where they parse, else kept as strings)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: tomli is the package tomllib was made from (same API and errors)
    import tomli as tomllib

__all__ = ["load_config", "select", "parse_overrides", "merge"]


def load_config(path: Optional[str]) -> dict:
    """The dict in a .toml or .json file ({} for None). A file may hold one method's keys, or
    tables per method ({"cyin": {...}, "dmrnet": {...}}): `select` picks them."""
    if path is None:
        return {}
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")     # TOML and JSON are UTF-8 by their specs
    except OSError as exc:
        raise ValueError(f"config file {p}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {p}: not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"config file {p}: expected a .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {p}: not valid {p.suffix[1:].upper()}: {exc}") from None
    except RecursionError:  # both parsers recurse per nesting level: "[[[[...": not a config
        raise ValueError(f"config file {p}: nested too deeply to be a config") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: the top level must be a table/object of keys")
    return data


def select(config: dict, method: str, known_methods: Iterable[str]) -> dict:
    """The keys for `method`: its own table if the file has per-method tables, plus the
    top-level keys that are not other methods' tables."""
    known = set(known_methods)
    out = {k: v for k, v in config.items() if k not in known}
    own = config.get(method, {})
    if not isinstance(own, dict):
        raise ValueError(f"config: [{method}] must be a table of keys, got {own!r}")
    out.update(own)
    return out


def parse_overrides(items: Optional[Iterable[str]]) -> dict:
    """['lr=1e-3', 'widths=[64,32]', 'sigmoid=true', 'name=abc'] -> dict."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
        except RecursionError:
            raise ValueError(f"--set {key.strip()}: the value is nested too deeply") from None
    return out


def merge(*configs: dict) -> dict:
    out: dict = {}
    for c in configs:
        out.update(c)
    return out
