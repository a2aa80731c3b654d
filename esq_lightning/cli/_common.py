"""What every entry point shares: user errors as one line on stderr, no traceback, exit code 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

from esq_lightning.config.commands import check_command_line, quote_pass_through
from esq_lightning.errors import ESQUserError, EvaluationFailed
from esq_lightning.notices import quiet_library_notices

CONFIG_PATH = "pkg://esq_lightning.conf"
# At import, before hydra.main runs: a sweeper (Optuna) logs its set-up lines before the first job starts.
quiet_library_notices()


def data_error_message(exc: BaseException) -> str | None:
    """The one line for a dataset file that is missing or unreadable, else None.

    The data layer raises CorruptArchiveError and FileNotFoundError with messages that already name
    the file; only those raised inside esq_lightning.data count, so that a FileNotFoundError from a
    bug elsewhere keeps its traceback.
    """
    if type(exc).__name__ == "CorruptArchiveError":
        return f"data: {exc}"
    if isinstance(exc, FileNotFoundError):
        tb = exc.__traceback__
        last = None
        while tb is not None:
            last = tb
            tb = tb.tb_next
        module = last.tb_frame.f_globals.get("__name__", "") if last is not None else ""
        if module.startswith("esq_lightning.data"):
            return f"data: {exc}"
    return None


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def user_errors_as_one_line(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_library_notices()
        try:
            return fn(*args, **kwargs)
        except ESQUserError as exc:
            from esq_lightning.artifacts.rundir import forget_fresh_run_dir

            forget_fresh_run_dir()  # a run refused before it starts leaves no directory behind
            print(f"error: {one_line(str(exc))}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except EvaluationFailed as exc:
            # results.json is written; the verdict is the result (docs/evaluation.md).
            print(one_line(str(exc)), file=sys.stderr, flush=True)
            raise SystemExit(3) from None
        except (OSError, RuntimeError) as exc:
            from esq_lightning.atomic import WriteFailed

            if isinstance(exc, WriteFailed):  # disk full, file-size limit, read-only: the old file is intact
                print(f"error: {one_line(exc.strerror or str(exc))}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            # Missing or corrupt dataset files surface inside Trainer.fit; they are the user's to fix.
            message = data_error_message(exc)
            if message is None:
                raise
            print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper


def run_hydra_command(
    command: str, hydra_main: Callable[[], Any], argv: Sequence[str] | None = None, pass_through: Sequence[str] = ()
) -> None:
    """Run the Hydra main of a command that is no training job (esq-report, esq-reproduce) on argv.

    Hydra refuses an unknown key, a positional word or a --flag with a long message; those are checked first
    and fail in one line (with "did you mean" for a misspelt key). The list keys in `pass_through` carry
    overrides of other commands (train=[trainer.max_epochs=2]): their items are quoted so that Hydra's grammar,
    which refuses '=' in an unquoted value, takes them as they are written.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    user_errors_as_one_line(check_command_line)(command, args)
    saved = sys.argv
    sys.argv = [command, *quote_pass_through(args, pass_through)]  # hydra.main reads sys.argv
    try:
        hydra_main()
    finally:
        sys.argv = saved


def composition_in_one_line(config_name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Compose `config_name` with the command line's overrides before Hydra does, so an unknown group option
    (`quant=bwm`) or a misspelt key is one line with the "did you mean" hint and exit code 2 instead of Hydra's
    message and exit code 1. Command lines with Hydra flags (-m, --cfg, --help, ...) go to Hydra as they are:
    `esq-train -m` checks every job itself (config/jobs.py)."""

    def decorate(hydra_main: Callable[[], Any]) -> Callable[[], Any]:
        @functools.wraps(hydra_main)
        def run() -> Any:
            args = sys.argv[1:]
            if args and not any(a.startswith("-") for a in args):
                from esq_lightning.config.jobs import _compose, _hydra

                try:
                    with _hydra():
                        _compose(config_name, list(args))
                except ESQUserError as exc:
                    print(f"error: {one_line(str(exc))}", file=sys.stderr, flush=True)
                    raise SystemExit(2) from None
            return hydra_main()

        return run

    return decorate
