"""Errors that are the user's to fix (a config value, a data file, a path), as opposed to bugs in trapo.

The `trapo` command prints a `UserError` as one line, `trapo: error: <message>`, and exits with status 1
(trapo_lightning/cli.py); `TRAPO_DEBUG=1` shows the traceback. Its message alone must therefore say what is wrong,
where (`file:line`, config key) and what to do. Anything else keeps its traceback: a KeyError or a ValueError deep
in the training code is a bug to report, and hiding where it happened would only hide the bug.

Each class also derives from the built-in type that code and tests already catch (`ValueError`, `ImportError`).
"""

from __future__ import annotations


class UserError(Exception):
    """Caused by the user's config, data or environment; the message says what to fix."""


class ConfigError(UserError, ValueError):
    """A config value that a component refused, or a setting this framework does not support."""


class DataError(UserError, ValueError):
    """Data that cannot be used: a malformed row, a split too small for one step, a file of the wrong kind."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency that the config needs is not installed; the message names the pip extra."""
