"""TOML, the format of every file users edit (recipes, train.toml, sweep.toml) and of the
cache's recipe.toml: one reader that explains a bad file, one small writer.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from store.errors import FacetclipError, InputError


def read_toml(path: str | Path, what: str, error: type[FacetclipError] = InputError) -> dict:
    """The table in ``path``; ``error`` (a user error) naming ``what`` it is, the file, and
    tomllib's line and column when it cannot be read or parsed."""
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise error(f"cannot read {what} {path}: {e}") from None


def dump_toml(d: dict) -> str:
    """A small TOML writer for flat tables plus arrays of tables (the recipe's shape)."""

    def scalar(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        # JSON string escapes are valid TOML basic-string escapes.
        return json.dumps(str(v), ensure_ascii=False)

    def table(prefix: str, t: dict, lines: list[str]) -> None:
        subtables = []
        for k, v in t.items():
            if isinstance(v, dict) or isinstance(v, list) and v and isinstance(v[0], dict):
                subtables.append((k, v))
            elif isinstance(v, (list, tuple)):
                lines.append(f"{k} = [{', '.join(scalar(x) for x in v)}]")
            else:
                lines.append(f"{k} = {scalar(v)}")
        for k, v in subtables:
            name = f"{prefix}{k}"
            if isinstance(v, dict):
                lines += ["", f"[{name}]"]
                table(name + ".", v, lines)
            else:
                for item in v:
                    lines += ["", f"[[{name}]]"]
                    table(name + ".", item, lines)

    lines: list[str] = []
    table("", d, lines)
    return "\n".join(lines).lstrip("\n") + "\n"
