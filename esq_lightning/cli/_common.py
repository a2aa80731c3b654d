"""What every entry point shares: user errors as one line on stderr, no traceback, exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from esq_lightning.errors import ESQUserError

CONFIG_PATH = "pkg://esq_lightning.conf"


def user_errors_as_one_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ESQUserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper
