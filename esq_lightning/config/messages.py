"""The one error-message layer of the config models: pydantic's first error as one line naming the key.

Every config model (config/schema.py for esq-train / esq-eval, config/commands.py for esq-report / esq-reproduce)
is validated through `validate`, and every failure reads `<key>: <value> <problem>; allowed: ...`. The text comes
from pydantic's own error fields (`ValidationError.errors()`: type, loc, input, ctx) and from the model's field
(Literal choices, ge/gt/le/lt bounds, the description as a note); custom text only where pydantic has none:
an unknown key (`unknown_key`, with a "did you mean" hint), a value check by code (`check`) and a rule between
keys (`rule`). Nothing here imports torch.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, Union

import annotated_types
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import AfterValidator, BaseModel, BeforeValidator, Tag, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from esq_lightning.errors import ESQUserError, did_you_mean, show_value

__all__ = [
    "Choice",
    "Unresolved",
    "at",
    "check",
    "dotted",
    "first_line",
    "join",
    "keys_of",
    "one_line",
    "plain",
    "rule",
    "show",
    "unknown_key",
    "validate",
]


# ---- what the models raise: custom errors the layer words (cross-key rules, checks by code, choices) -------
def rule(sub: str, text: str) -> PydanticCustomError:
    """A cross-key rule's error: `text` is the message after `<node>.<sub>: `; `{key}` in it is the node's key."""
    return PydanticCustomError("esq_rule", "{text}", {"sub": sub, "text": text})


def check(fn: Callable[[Any], str | None]) -> Any:
    """A value check by code (fn returns what is allowed when the value is not)."""

    def run(value: Any) -> Any:
        problem = fn(value)
        if problem:
            raise PydanticCustomError("esq_check", "{allowed}", {"allowed": problem})
        return value

    return AfterValidator(run)


class LiveChoices:
    """Field metadata of a LiveChoice: the choices, read when a config is checked."""

    def __init__(self, values: Callable[[], Iterable[Any]]) -> None:
        self.values = values

    def __call__(self) -> tuple:
        return tuple(self.values())


def LiveChoice(values: Callable[[], Iterable[Any]]) -> Any:
    """One of ``values()`` at check time, so a registered entry (a quantizer family) is a choice too.

    Checks and words errors like Choice: the value's type must be the choice's (true is not 1, '1' not 1).
    """
    choices = LiveChoices(values)

    def check(value: Any) -> Any:
        if not any(type(value) is type(c) and value == c for c in choices()):
            raise PydanticCustomError("literal_error", "not one of the choices")
        return value

    return Annotated[Any, choices, BeforeValidator(check)]


def Choice(*values: Any) -> Any:
    """One of `values` (true/false are not 1/0 here)."""

    def no_bool(value: Any) -> Any:
        if isinstance(value, bool) and not any(isinstance(c, bool) for c in values):
            raise PydanticCustomError("literal_error", "not one of the choices")
        return value

    return Annotated[Literal[values], BeforeValidator(no_bool)]  # type: ignore[valid-type]


# ---- from a config to a model, and pydantic's first error to one line ---------------------------------------
def keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


class Unresolved:
    """A value that could not be resolved; reported only where a model reads it."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def plain(node: Any, key: str) -> Any:
    """The config as plain containers, resolved key by key (a failing interpolation becomes Unresolved)."""
    if isinstance(node, DictConfig):
        out = {}
        for k in node:
            k = str(k)
            if key == "" and k == "hydra":
                continue  # Hydra's own node (there when composed with return_hydra_config=True)
            if OmegaConf.is_missing(node, k):
                out[k] = Unresolved(f"??? (no value given); set it, e.g. {join(key, k)}=...")
                continue
            try:
                value = node[k]
            except OmegaConfBaseException as exc:
                out[k] = Unresolved(f"cannot resolve its value: {first_line(exc)}")
                continue
            out[k] = plain(value, join(key, k))
        return out
    if isinstance(node, ListConfig):
        out_list = []
        for i in range(len(node)):
            try:
                out_list.append(plain(node[i], f"{key}[{i}]"))
            except OmegaConfBaseException as exc:
                out_list.append(Unresolved(f"cannot resolve its value: {first_line(exc)}"))
        return out_list
    return node


def validate(model: type[BaseModel], cfg: Any, key: str = "", root: str = "the config") -> tuple[BaseModel, dict]:
    """(the model of cfg, cfg as plain containers); the first problem raises ESQUserError (one line).

    `key` is where cfg sits in the whole config (its keys are named from there), `root` what the top-level
    keys belong to in the unknown-key message ("the config", or the command whose options they are)."""
    data = plain(cfg, key)
    try:
        return model.model_validate(data), data
    except ValidationError as exc:
        raise ESQUserError(one_line(exc.errors()[0], model, data, key, root)) from None


def unknown_key(parent: str, name: str, declared: list[str], root: str = "the config") -> str:
    """`<parent>.<name>: unknown key (did you mean 'x'?); allowed keys of <parent>: ...` (root at the top level)."""
    return (
        f"{dotted(parent, (name,))}: unknown key{did_you_mean(name, declared)}; allowed keys of "
        f"{parent or root}: {', '.join(declared)}"
    )


def one_line(err: dict, model: type[BaseModel], data: Any, prefix: str, root: str = "the config") -> str:
    """pydantic's error (`ValidationError.errors()` item: type, loc, input, ctx) as one line, `<key>: <value>
    <problem>; allowed: ...`, with the allowed values read from the model's field (Literal choices, ge/gt/le/lt
    bounds, its description as a note)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    # pydantic's location, without the tags of our tagged unions (data, known callbacks).
    loc, owner, info = _locate(model, err["loc"])
    index = loc and isinstance(loc[-1], int)
    path = loc[:-1] if index else loc
    node_key = dotted(prefix, loc)
    value = at(data, path)
    if isinstance(err.get("input"), Unresolved) or isinstance(value, Unresolved):
        problem = err["input"].problem if isinstance(err.get("input"), Unresolved) else value.problem
        return f"{dotted(prefix, loc)}: {problem}"
    if kind == "esq_rule":
        sub = ctx.get("sub", "")
        key = dotted(node_key, tuple(sub.split("."))) if sub else node_key
        text = str(ctx.get("text", err["msg"])).replace("{key}", node_key)
        if "{value}" in text:
            text = text.replace("{value}", show(at(data, (*loc, *sub.split(".")))))
        return f"{key}: {text}"
    if kind == "extra_forbidden":
        sub = ctx.get("sub")
        parent = node_key if sub is not None else dotted(prefix, loc[:-1])
        name = str(sub if sub is not None else loc[-1])
        return unknown_key(parent, name, keys_of(owner) if owner is not None else [], root)
    key = dotted(prefix, path)
    if kind == "missing":
        return f"{key}: missing; it must be set"
    shown = show(value)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key}: {shown} is not a mapping; allowed: a mapping of {key} keys"
    name = str(path[-1]) if path else ""
    allowed = _allowed(name, info)
    if kind == "esq_check":
        return f"{key}: {shown} is not allowed; allowed: {ctx['allowed']}"
    if kind == "literal_error":
        choices = _choices(info)
        if index and isinstance(value, list):
            items, value = value, err["input"]  # one item of a list: the hint is for it
            shown = f"{shown} (item {show(value)})" if len(items) > 1 else show(value)
        hint = did_you_mean(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""
        return f"{key}: {shown} is not allowed; allowed: {allowed}{hint}"
    if kind == "too_short":
        n = int(ctx.get("min_length", 1))
        least = f"at least {n} item" + ("s" if n != 1 else "")
        return f"{key}: {shown} is too short; allowed: {least}" + (
            f" ({info.description})" if info and info.description else ""
        )
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        if index and isinstance(value, list) and len(value) > 1:
            shown = f"{shown} (item {show(err['input'])})"
        return f"{key}: {shown} is out of range; allowed: {allowed}"
    what = _TYPE_NAMES.get(kind.split("_")[0], "of the right type")
    if index:
        what = f"a list of {what.removeprefix('a ').removeprefix('an ')}s"
    return f"{key}: {shown} is not {what}; allowed: {allowed or what}"


_TYPE_NAMES = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "string": "a string",
    "list": "a list",
    "dict": "a mapping",
    "literal": "one of the choices",
}


def _locate(model: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None, FieldInfo | None]:
    """(loc without union tags, the model at loc (or owning its last key), the FieldInfo of the last key)."""
    out: list[Any] = []
    owner: Any = model
    info: FieldInfo | None = None
    tp: Any = model
    for part in loc:
        members = _union_members(tp)
        if members and part in members:
            tp = members[part]
            continue
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            owner = tp
            fields = {f.alias or n: f for n, f in tp.model_fields.items()}
            out.append(part)
            if part in fields:
                info = fields[part]
                tp = info.annotation
            else:
                info, tp = None, Any
            continue
        out.append(part)
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and args:
            item = args[0]
            if typing.get_origin(item) is Annotated:
                outer = info
                info = FieldInfo.from_annotation(item)
                info.description = info.description or (outer.description if outer is not None else None)
            tp = item
    final = _unwrap(tp)
    if isinstance(final, type) and issubclass(final, BaseModel):
        owner = final
    return tuple(out), owner, info


def _unwrap(tp: Any) -> Any:
    """The model class inside Optional[...] / Annotated[...], else tp."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin is Union:
            models = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(models) != 1:
                return tp
            tp = models[0]
        else:
            return tp


def _union_members(tp: Any) -> dict[str, Any]:
    """Tag -> member of a tagged union inside tp (Optional / Annotated around it included)."""
    for _ in range(4):
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            tp = args[0]
            continue
        if origin is Union:
            tags = {}
            for a in args:
                for m in typing.get_args(a)[1:] if typing.get_origin(a) is Annotated else ():
                    if isinstance(m, Tag):
                        tags[m.tag] = typing.get_args(a)[0]
            if tags:
                return tags
            inner = [a for a in args if a is not type(None)]
            if len(inner) != 1:
                return {}
            tp = inner[0]
            continue
        return {}
    return {}


def _choices(info: FieldInfo | None) -> tuple:
    live = [m for m in info.metadata if isinstance(m, LiveChoices)] if info is not None else []
    if live:
        return live[0]()
    tp = info.annotation if info is not None else None
    for _ in range(3):
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        if typing.get_origin(tp) is Literal:
            return typing.get_args(tp)
    return ()


def _allowed(name: str, info: FieldInfo | None) -> str:
    if info is None:
        return ""
    choices = _choices(info)
    bounds = {
        op: getattr(m, op)
        for m in info.metadata
        for op in ("gt", "ge", "lt", "le")
        if isinstance(m, getattr(annotated_types, op.capitalize()))
    }
    if choices:
        text = ", ".join(show(c) for c in choices)
    elif bounds:
        lo = f"{_num(bounds['gt'])} < " if "gt" in bounds else f"{_num(bounds['ge'])} <= " if "ge" in bounds else ""
        hi = f" < {_num(bounds['lt'])}" if "lt" in bounds else f" <= {_num(bounds['le'])}" if "le" in bounds else ""
        text = f"{lo}{name}{hi}"
    else:
        text = ""
    note = info.description or ""
    return f"{text} ({note})" if text and note else text or note


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def at(data: Any, path: Iterable[Any]) -> Any:
    for part in path:
        if (
            isinstance(data, dict)
            and part in data
            or isinstance(data, list)
            and isinstance(part, int)
            and part < len(data)
        ):
            data = data[part]
        else:
            return None
    return data


def dotted(prefix: str, path: Iterable[Any]) -> str:
    key = prefix
    for part in path:
        key = f"{key}[{part}]" if isinstance(part, int) else join(key, part)
    return key


def join(key: str, sub: Any) -> str:
    return f"{key}.{sub}" if key else str(sub)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


show = show_value  # values as a config writes them (esq_lightning.errors)
