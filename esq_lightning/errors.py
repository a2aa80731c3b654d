"""User-facing errors: one line naming the key or file and what is allowed, printed without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class ESQUserError(ValueError):
    """A mistake in the user's config, paths or files; the CLI prints its message alone and exits with code 2."""


class EvaluationFailed(RuntimeError):
    """The run finished and wrote its results, but its robustness cannot be measured honestly (verdict fail).

    The CLI prints the message alone and exits with code 3 (a result, not a crash: results.json is written)."""


def did_you_mean(name: Any, options: Iterable[Any]) -> str:
    """' (did you mean 'x'?)' for the closest of `options` to a misspelt `name`, '' when none is close."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def show_value(value: Any) -> str:
    """A value as the user would write it in a config, for error lines: 'text', true, null, [1, 2], {k: v}."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    return str(value)
