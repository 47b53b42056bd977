"""One exception type for everything a user can get wrong.

The CLI turns an `MmlitError` into a one-line message and a non-zero exit code; anything
else is a bug and keeps its traceback (shown with `--debug`).
"""


class MmlitError(Exception):
    """A mistake in the user's input (bad preset, missing data, wrong checkpoint...)."""


class ConfigError(MmlitError):
    """A preset, YAML file or `--set` override that does not fit the schema."""


class DataError(MmlitError):
    """A dataset that is missing, malformed or unusable."""


class CheckpointError(MmlitError):
    """A checkpoint that cannot be read or does not fit what was asked of it."""
