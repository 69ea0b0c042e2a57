"""One typed source of configuration: dataclasses whose fields carry their default and help once.

pydantic validates every config (from Python, YAML or the command line) against the field types, so
`base_tokens: "2e6"` fails when the file is read, with the file and key in the message; `flags` makes
the command-line flags of a command from the same fields, and `load_yaml` reads a `--config` file.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import pydantic
import yaml

from .errors import UserError

# extra="forbid": an unknown key is an error, not silently ignored
CONFIG = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def config(cls):
    """Decorator: a validated dataclass (types checked, and converted where the value is unambiguous:
    "3" → 3, "false" → False, [0.9, 0.95] → (0.9, 0.95))."""
    return pydantic.dataclasses.dataclass(cls, config=CONFIG)


def arg(default=dataclasses.MISSING, help: str = "", *, factory=None, path: bool = False, flag: bool = True,
        aliases: tuple[str, ...] = ()):
    """A config field: its default, its help text, whether it names a file or folder (stored relative
    to the run folder in run records), whether the command line gets a flag for it, and the older names
    (`aliases`) a YAML key, a saved spec or a flag may still use for it."""
    meta = {"help": help, "path": path, "flag": flag, "aliases": aliases}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "unexpected_keyword_argument" or error["type"] == "extra_forbidden":
        return f"unknown key '{loc}'"
    if error["type"] == "missing_argument" or error["type"] == "missing":
        return f"'{loc}' is required"
    if error["type"] == "value_error" and not error["loc"]:  # a __post_init__ check: its message names the key
        return str(error["ctx"]["error"])
    return f"'{loc}': {error['msg'].lower()}, got {error.get('input')!r}"


def build(cls, data: dict | None, where: str):
    """`cls(**data)` with every type checked; a problem becomes one UserError naming `where` (a file,
    a flag group), the key and what was expected."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    data = _canonical_keys(cls, data, where)
    try:
        return pydantic.TypeAdapter(cls).validate_python(data)
    except pydantic.ValidationError as e:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        problems = "; ".join(_describe(err) for err in e.errors())
        top_level_unknown = any(err["type"] in ("unexpected_keyword_argument", "extra_forbidden")
                                and len(err["loc"]) == 1 for err in e.errors())
        hint = f" (known keys: {known})" if top_level_unknown else ""
        raise UserError(f"{where}: {problems}{hint}") from None
    except (TypeError, ValueError) as e:  # a __post_init__ check
        raise UserError(f"{where}: {e}") from None


def _canonical_keys(cls, data: dict, where: str) -> dict:
    """`data` with each field's older name (`arg(aliases=...)`: `strategy` for `method`) read as the field's."""
    if not dataclasses.is_dataclass(cls):
        return data
    data = dict(data)
    for f in dataclasses.fields(cls):
        for alias in f.metadata.get("aliases", ()):
            if alias in data:
                if f.name in data:
                    raise UserError(f"{where}: '{alias}' is the older name of '{f.name}': give one of them")
                data[f.name] = data.pop(alias)
    return data


def field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _is_sequence(tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_is_sequence(a) for a in typing.get_args(tp) if a is not type(None))
    return origin in (list, tuple) or tp in (list, tuple)


def parse_text(cls, name: str, text: str):
    """A command-line string for field `name` of `cls`: lists and tuples are comma-separated
    (`target_modules=q_proj,v_proj`); everything else is converted by the field's type in `build`."""
    tp = field_types(cls)[name]
    if _is_sequence(tp):
        return [item.strip() for item in text.split(",") if item.strip()]
    if text.lower() in ("none", "null") and type(None) in typing.get_args(tp):
        return None
    return text


def default_of(cls, name: str):
    """The default of field `name` of `cls` (its factory's value where it has one)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)


def flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, skip: tuple[str, ...] = (),
          defaults=None) -> None:
    """One flag per field of `cls` (`batch_size` → `--batch-size`), help and default from the field, or from
    `defaults` (an instance of `cls`: the defaults a command gives it, as the demo's training loop has its own).
    Nested dataclasses and fields marked flag=False are left to the YAML file."""
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in skip or not f.metadata.get("flag", True) or dataclasses.is_dataclass(tp):
            continue
        default = getattr(defaults, f.name) if defaults is not None else default_of(cls, f.name)
        said = "default:" in f.metadata.get("help", "")  # the help itself says it (a default that depends)
        shown = "" if said or default in (None, "", dataclasses.MISSING) else f" (default: {default})"
        help_text = (f.metadata.get("help", "") + shown).replace("%", "%%")
        names = ["--" + n.replace("_", "-") for n in (f.name, *f.metadata.get("aliases", ()))]
        if tp is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            literal = [a for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is typing.Literal]
            choices = list(typing.get_args(literal[0])) if literal else None
            parser.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, help=help_text, choices=choices,
                                metavar=None if choices else _metavar(tp, f))


def _metavar(tp, f) -> str:
    if f.metadata.get("path"):
        return "PATH"
    base = {int: "N", float: "X", str: "NAME"}
    kinds = [a for a in (tp, *typing.get_args(tp)) if a in base]
    if not kinds:  # Annotated[int, ...]: look one level down
        kinds = [b for a in typing.get_args(tp) for b in (a, *typing.get_args(a)) if b in base]
    return base[kinds[0]] if kinds else "LIST" if _is_sequence(tp) else "VALUE"


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of `cls` set on the command line (absent flags leave the YAML value or the default)."""
    return {f.name: (parse_text(cls, f.name, getattr(args, f.name)) if isinstance(getattr(args, f.name), str)
                     else getattr(args, f.name))
            for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def load_yaml(path: str | Path) -> dict:
    """A YAML config file as a mapping; a missing or malformed file names the file and line."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of keys to values at the top level, got {type(raw).__name__}")
    return raw


def path_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("path")]
