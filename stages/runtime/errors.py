"""The failures a user fixes from the message alone: a config value, a model folder, a data row, a
judge server, a resource limit, a non-finite loss, a killed rank.

Every such error derives from `ExpectedFailure` (beside the builtin it refines, so `except
ValueError` still catches a `ConfigError`). The command line prints one `error: <message>` line
and exits 1 (`flows/pipeline.py`); Prefect's and MLflow's records keep the traceback. Anything
else is a bug and keeps its stack.
"""

from __future__ import annotations


class ExpectedFailure(Exception):
    """A failure whose message names what to change (a key, a file and line, a folder, a server)."""


class ConfigError(ExpectedFailure, ValueError):
    """A config value out of its range, or keys that cannot run together: the key named."""


class NonFiniteStop(ExpectedFailure, FloatingPointError):
    """Training stopped at a non-finite loss; the message names the learning rate to lower."""


class LabelsMissing(RuntimeError):
    """Raised by the file labeler until the rankers' file exists; the message says how to resume (the
    run waits for people, it did not fail: exit code 2)."""
