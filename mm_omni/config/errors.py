"""The error of a bad flag or flag combination (its own module, so that every check of the flags can raise it)."""


class ArgumentsError(ValueError):
    """A bad flag or combination, raised before any model is built."""
