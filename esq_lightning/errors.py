"""User-facing errors: one line naming the key or file and what is allowed, printed without a traceback."""


class ESQUserError(ValueError):
    """A mistake in the user's config, paths or files; the CLI prints its message alone and exits with code 2."""
