"""Each setting declared once, on its config field: whether it is the run's recipe or how the run is
carried out, and whether it has a command-line flag. The flags, the resume merge and the check that
refuses recipe flags on --resume all follow from these declarations.

    conv1_ceil: bool = field(default=False, metadata=flag("help text"))        # a recipe flag
    workers: int = field(default=4, metadata=runtime())                          # runtime, no flag here
    comm_timeout: float = field(default=600.0, metadata=runtime(flag("...")))   # a runtime flag

A recipe setting is stored in the checkpoint and kept on resume (a differing flag is refused); a
runtime setting (where the data is, how long, on what device, what to log) comes from the command line
of every launch. A declared flag is --field-name (or --dest, where the declaration names one); given,
it wins over the --variant preset; left out, the field keeps its default (or the preset's value).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterator


def flag(help: str, **argparse_kw: Any) -> dict:
    """Field metadata: a command-line flag --<field-name> sets this field. argparse_kw go to add_argument
    (choices, type, nargs, metavar, action); besides, `dest` names the flag when it is not the field's
    name, `convert` (a function) turns the parsed value into the field's, and `negate=True` makes a
    bool field's --no-... switch (given, the field is False)."""
    return {"flag": dict(help=help, **argparse_kw)}


def runtime(flag_metadata: dict | None = None) -> dict:
    """Field metadata: a runtime setting (taken from the command line on resume, not from the checkpoint)."""
    return {"runtime": True, **(flag_metadata or {})}


def _parts(config_cls: type, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dataclasses.Field]]:
    """(path, field) for the fields of config_cls (path ()) and, after them, of its dataclass-valued fields,
    at any depth (path ("model", "lrn") for ModelConfig's LRNConfig)."""
    nested = []
    for f in dataclasses.fields(config_cls):
        inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            nested.append((f.name, inner))
        else:
            yield path, f
    for name, inner in nested:
        yield from _parts(inner, path + (name,))


def runtime_fields(config_cls: type) -> tuple[str, ...]:
    """The runtime fields declared directly on config_cls."""
    return tuple(f.name for f in dataclasses.fields(config_cls) if f.metadata.get("runtime"))


def declared_flags(config_cls: type, runtime: bool | None = None) -> list[tuple[tuple[str, ...], dataclasses.Field]]:
    """(path, field) of every field of config_cls and its parts that declares a flag; only the runtime
    ones, or only the recipe ones, if `runtime` says which."""
    return [(path, f) for path, f in _parts(config_cls) if "flag" in f.metadata
            and runtime in (None, bool(f.metadata.get("runtime")))]


def flag_dest(f: dataclasses.Field) -> str:
    """The flag's name with underscores: the field's, unless its declaration names another (dest=...)."""
    return f.metadata["flag"].get("dest", f.name)


def runtime_flags(config_cls: type) -> set[str]:
    """The dests of the declared runtime flags: those a resumed run takes from its command line."""
    return {flag_dest(f) for _path, f in declared_flags(config_cls, runtime=True)}


def add_declared_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, config_cls: type,
                       runtime: bool | None = None) -> None:
    """One argparse option per declared flag (the runtime ones, or the recipe ones, if `runtime` says
    which); its value is None when the command line leaves it out."""
    for _path, f in declared_flags(config_cls, runtime):
        kw = {k: v for k, v in f.metadata["flag"].items() if k not in ("convert", "dest", "negate")}
        if isinstance(f.default, bool) and "action" not in kw:
            kw["action"] = "store_true"
        elif "type" not in kw and "action" not in kw and f.default not in (None, dataclasses.MISSING):
            kw["type"] = type(f.default)
        dest = flag_dest(f)
        parser.add_argument("--" + dest.replace("_", "-"), dest=dest, default=None, **kw)


def _field_value(f: dataclasses.Field, value: Any) -> Any:
    """A parsed flag's value as its field holds it."""
    spec = f.metadata["flag"]
    if spec.get("negate"):
        return not value
    return spec["convert"](value) if "convert" in spec else value


def _replaced(obj: Any, changes: dict[tuple[str, ...], dict[str, Any]], path: tuple[str, ...] = ()) -> Any:
    """obj with changes[path] on itself and changes[path + (name,)] on its part `name`, at any depth;
    each config is built once, with all its changes (its checks see the finished config)."""
    parts = {name: _replaced(getattr(obj, name), changes, path + (name,))
             for name in {p[len(path)] for p in changes if len(p) > len(path) and p[:len(path)] == path}}
    return dataclasses.replace(obj, **changes.get(path, {}), **parts)


def apply_declared_flags(cfg: Any, args: argparse.Namespace) -> Any:
    """cfg with every declared flag the command line gave."""
    changes: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, f in declared_flags(type(cfg)):
        value = getattr(args, flag_dest(f), None)
        if value is not None:
            changes.setdefault(path, {})[f.name] = _field_value(f, value)
    return _replaced(cfg, changes) if changes else cfg


def recipe_flag_settings(config_cls: type) -> dict[str, Callable[[Any], Any]]:
    """For each declared recipe flag: how to read its setting from a config, as the flag writes it (to
    compare on resume, and to name it: --no-flip's setting is `not flip`)."""
    def getter(path: tuple[str, ...], f: dataclasses.Field) -> Callable[[Any], Any]:
        def setting(cfg: Any) -> Any:
            for name in path:
                cfg = getattr(cfg, name)
            value = getattr(cfg, f.name)
            return not value if f.metadata["flag"].get("negate") else value
        return setting

    return {flag_dest(f): getter(path, f) for path, f in declared_flags(config_cls, runtime=False)}


def as_flag(dest: str, value: Any) -> str:
    """A setting as the command line writes it: `--lr 0.02`, `--no-flip`, `--milestones 25 51 79`."""
    name = "--" + dest.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"no {name}"
    if isinstance(value, tuple):
        return " ".join([name, *map(str, value)]) if value else f"{name} (none)"
    return f"{name} {'(all)' if value is None else format(value, 'g') if isinstance(value, float) else value}"


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
