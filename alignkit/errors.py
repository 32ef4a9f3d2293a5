"""The base of every error alignkit expects users to meet.

An :class:`AlignkitError` is a problem with the user's input or environment (a config key, a data row, a
checkpoint, a missing package) whose message already says where and what to do. The CLI prints it as one
line from rank 0 and exits with code 2; a traceback is shown only with ``--debug`` (or
``ALIGNKIT_DEBUG=1``). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AlignkitError(Exception):
    """An expected error whose message names the file/row/field or key and the fix."""


class TrainingError(AlignkitError, RuntimeError):
    """Training cannot continue; the message says why and what to do."""
