"""Each setting declared once, on its config field: whether it is the run's recipe or how the run is
carried out, and whether it has a command-line flag. The flags, the resume merge and the check that
refuses recipe flags on --resume all follow from these declarations.

    conv1_ceil: bool = field(default=False, metadata=flag("help text"))        # a recipe flag
    workers: int = field(default=4, metadata=runtime())                          # runtime, no flag here
    comm_timeout: float = field(default=600.0, metadata=runtime(flag("...")))   # a runtime flag

A recipe setting is stored in the checkpoint and kept on resume (a differing flag is refused); a
runtime setting (where the data is, how long, on what device, what to log) comes from the command line
of every launch. A declared flag is --field-name; given, it wins over the --variant preset; left out,
the field keeps its default (or the preset's value).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterator


def flag(help: str, **argparse_kw: Any) -> dict:
    """Field metadata: a command-line flag --<field-name> sets this field. argparse_kw go to add_argument
    (choices, type, nargs, metavar, action); `convert` (a function) turns the parsed value into the field's."""
    return {"flag": dict(help=help, **argparse_kw)}


def runtime(flag_metadata: dict | None = None) -> dict:
    """Field metadata: a runtime setting (taken from the command line on resume, not from the checkpoint)."""
    return {"runtime": True, **(flag_metadata or {})}


def _parts(config_cls: type) -> Iterator[tuple[str, dataclasses.Field]]:
    """(part, field) for the fields of config_cls ("") and of its dataclass-valued fields (their name)."""
    for f in dataclasses.fields(config_cls):
        inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            yield from ((f.name, g) for g in dataclasses.fields(inner))
        else:
            yield "", f


def runtime_fields(config_cls: type) -> tuple[str, ...]:
    """The runtime fields declared directly on config_cls."""
    return tuple(f.name for f in dataclasses.fields(config_cls) if f.metadata.get("runtime"))


def declared_flags(config_cls: type) -> list[tuple[str, dataclasses.Field]]:
    """(part, field) of every field of config_cls and its parts that declares a flag."""
    return [(part, f) for part, f in _parts(config_cls) if "flag" in f.metadata]


def add_declared_flags(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One argparse option per declared flag; its value is None when the command line leaves it out."""
    for _part, f in declared_flags(config_cls):
        kw = {k: v for k, v in f.metadata["flag"].items() if k not in ("convert", "dest")}
        if f.default is False and "action" not in kw:
            kw["action"] = "store_true"
        elif "type" not in kw and "action" not in kw and f.default not in (None, dataclasses.MISSING):
            kw["type"] = type(f.default)
        dest = flag_dest(f)
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, default=None, **kw)


def flag_dest(f: dataclasses.Field) -> str:
    """The flag's name with underscores: the field's, unless its declaration names another (dest=...)."""
    return f.metadata["flag"].get("dest", f.name)


def apply_declared_flags(cfg: Any, args: argparse.Namespace) -> Any:
    """cfg with every declared flag the command line gave."""
    changes: dict[str, dict[str, Any]] = {}
    for part, f in declared_flags(type(cfg)):
        value = getattr(args, flag_dest(f), None)
        if value is not None:
            convert = f.metadata["flag"].get("convert")
            changes.setdefault(part, {})[f.name] = convert(value) if convert else value
    top = changes.pop("", {})
    parts = {part: dataclasses.replace(getattr(cfg, part), **values) for part, values in changes.items()}
    return dataclasses.replace(cfg, **top, **parts)


def recipe_flag_settings(config_cls: type) -> dict[str, Callable[[Any], Any]]:
    """For each declared recipe flag: how to read its setting from a config (to compare on resume)."""
    def getter(part: str, name: str) -> Callable[[Any], Any]:
        return lambda cfg: getattr(getattr(cfg, part) if part else cfg, name)

    return {flag_dest(f): getter(part, f.name) for part, f in declared_flags(config_cls)
            if not f.metadata.get("runtime")}


def merge_runtime(saved: Any, requested: Any, keep_saved: tuple[str, ...] = ()) -> Any:
    """The saved config (the recipe) with the requested config's runtime fields, on config_cls and its
    parts, except those in keep_saved; a requested None or "" keeps the saved value (e.g. --data left out)."""
    cls = type(saved)
    top = {name: getattr(requested, name) for name in runtime_fields(cls) if name not in keep_saved}
    parts = {}
    for f in dataclasses.fields(cls):
        value = getattr(saved, f.name)
        if dataclasses.is_dataclass(value) and runtime_fields(type(value)):
            new = {n: getattr(getattr(requested, f.name), n) for n in runtime_fields(type(value))}
            parts[f.name] = dataclasses.replace(value, **{n: v for n, v in new.items() if v not in (None, "")})
    return dataclasses.replace(saved, **top, **parts)
