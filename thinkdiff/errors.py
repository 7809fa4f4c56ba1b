"""Errors a user causes and can fix. The command-line entry points print them as one line (`error: ...`, exit 2);
every other exception is a bug and keeps its traceback.

Each also derives from the built-in type a Python caller would catch (`ValueError`, `FileNotFoundError`,
`ImportError`), so `except ValueError` keeps working for users of the Python API.
"""

from __future__ import annotations


class ThinkDiffUserError(Exception):
    """Base class: something in the user's config, command line, inputs or environment is wrong."""


class ConfigError(ThinkDiffUserError, ValueError):
    """A config key or value (YAML, `key.sub=value` override or command-line option) is wrong."""


class InputError(ThinkDiffUserError, ValueError):
    """An input is wrong: a prompt, an image, a tensor's shape, a data or checkpoint file's contents."""


class MissingFileError(ThinkDiffUserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class MissingWeightsError(MissingFileError):
    """The weights a config names are not on this machine (the message says what to download)."""


class MissingDependencyError(ThinkDiffUserError, ImportError):
    """An optional package a feature needs is not installed, or has another version than the one pinned."""
