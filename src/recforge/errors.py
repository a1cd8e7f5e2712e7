"""The errors a user can cause, one type per layer.

Each names what the user can fix: the file, the key or column, and the row or line where there
is one. The command line prints any of them as one line ``error: <message>`` and exits with
code 2; ``RECFORGE_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

DEBUG_ENV = "RECFORGE_DEBUG"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` with the choice closest to ``word``, or nothing when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class RecforgeError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(RecforgeError, ValueError):
    """An experiment config, study spec, override or trainer setting that cannot be used."""


class DataError(RecforgeError, ValueError):
    """Bad input data or schema; names the file, the column and the line or row."""


class ModelConfigError(RecforgeError, ValueError):
    """A model name or model parameters that do not validate; names the model and the key."""


class RunError(RecforgeError, ValueError):
    """A run folder that cannot be written, resumed or evaluated as asked."""


class CheckpointError(RecforgeError, ValueError):
    """A checkpoint or bundle file that is missing, truncated or corrupted; names the file."""
