"""Dataclass configs that users edit as TOML: the one implementation of reading, writing and
overriding them, shared by every trainer (``train``, ``tune``, ``pformer``).

A config is a dataclass whose fields are scalars, lists, tuples, free-form tables (dict) or
nested dataclass sections; it inherits ``TomlConfig``:

    @dataclass
    class MyConfig(TomlConfig):
        steps: int = 100
        optim: OptimConfig = field(default_factory=OptimConfig)

    cfg = MyConfig.from_toml("my.toml").override(["optim.lr=1e-3"])   # --set optim.lr=1e-3
    Path("run/config.toml").write_text(cfg.to_toml())

Unknown fields are user errors naming the field and the known ones; TOML has no null, so a
field that is None is left out of the file and reads back as its default.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Self

from store.errors import InputError
from store.tomlfile import dump_toml, read_toml


def drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: drop_none(v) for k, v in d.items() if v is not None}
    return d


def build(cls: type, d: dict, where: str = "") -> Any:
    """``cls(**d)`` with nested sections built recursively, lists read into tuple fields, and
    an InputError naming unknown fields (``where``: the section, for messages)."""
    if not isinstance(d, dict):
        raise InputError(f"config section {where or 'top level'} must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    if unknown:
        raise InputError(
            f"unknown config field(s) {sorted(unknown)} in {where or 'the top level'}; "
            f"known: {', '.join(known)}"
        )
    kwargs = {}
    for name, value in d.items():
        f = known[name]
        default = f.default_factory() if callable(f.default_factory) else f.default
        if is_dataclass(default):
            kwargs[name] = build(type(default), value, f"[{where}{name}]")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise InputError(f"bad config {where}: {e}") from None


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "model.tower=resnet50"]`` -> {dotted field: value}; values are read
    as TOML (numbers, booleans, lists), anything else as a string."""
    values = {}
    for a in assignments:
        if "=" not in a:
            raise InputError(f"--set expects FIELD=VALUE (e.g. optim.lr=1e-3), got {a!r}")
        path, raw = a.split("=", 1)
        try:
            values[path.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[path.strip()] = raw
    return values


class TomlConfig:
    """Reading, writing and overriding for a dataclass config (see the module docstring)."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    def to_toml(self) -> str:
        return dump_toml(drop_none(self.to_dict()))

    @classmethod
    def from_dict(cls, d: dict) -> Self:
        return build(cls, d)

    @classmethod
    def from_toml(cls, path: str | Path) -> Self:
        return cls.from_dict(read_toml(path, "config"))

    def override(self, assignments: list[str]) -> Self:
        """Apply ``--set section.field=value`` overrides."""
        return self.assign(parse_assignments(assignments))

    def assign(self, values: dict, source: str = "--set") -> Self:
        """A copy with dotted fields set (``{"optim.lr": 1e-3}``); an unknown field is an
        InputError naming it and ``source`` (``--set``, an option, a sweep.toml table). Inside
        a free-form table (e.g. ``model.tower_kwargs``) any key goes."""
        d = self.to_dict()
        for path, value in values.items():
            node, section = d, self
            parts = path.strip().split(".")
            for p in parts[:-1]:
                child = getattr(section, p, None) if section is not None else node.get(p, {})
                if not (is_dataclass(child) or isinstance(child, dict)):
                    raise InputError(f"{source} {path}: {p!r} is not a config section")
                node = node.setdefault(p, {})
                section = child if is_dataclass(child) else None
            if section is not None and parts[-1] not in node:
                raise InputError(
                    f"{source} {path}: unknown field; known: {', '.join(sorted(node))}"
                )
            node[parts[-1]] = value
        return type(self).from_dict(d)
