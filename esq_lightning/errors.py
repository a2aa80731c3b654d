"""User-facing errors: one line naming the key or file and what is allowed, printed without a traceback."""


class ESQUserError(ValueError):
    """A mistake in the user's config, paths or files; the CLI prints its message alone and exits with code 2."""


class EvaluationFailed(RuntimeError):
    """The run finished and wrote its results, but its robustness cannot be measured honestly (verdict fail).

    The CLI prints the message alone and exits with code 3 (a result, not a crash: results.json is written)."""
