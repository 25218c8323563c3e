"""The library's errors: each says what is wrong in terms of the data, the predicate or the
config field, never of a command-line flag; the CLI turns any of them into a one-line message."""

from __future__ import annotations


class SynprefError(ValueError):
    """A bad input the user can fix (a config value, a predicate, a file, a model)."""


class ConfigError(SynprefError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


class SelectionError(SynprefError):
    """A selection predicate is not valid SQL over the table it selects from."""


class FormatError(SynprefError):
    """A file or record layout cannot be read; the message names the file and the field."""


class ResourceError(SynprefError):
    """Configured actors cannot be scheduled on this cluster."""
