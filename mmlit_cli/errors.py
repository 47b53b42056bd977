"""One exception type for everything a user can get wrong.

The CLI turns an `MmlitError` into a one-line message and a non-zero exit code; anything
else is a bug and keeps its traceback (shown with `--debug`). `one_line` puts any exception
into such a message.
"""


class MmlitError(Exception):
    """A mistake in the user's input (bad preset, missing data, wrong checkpoint...)."""


class ConfigError(MmlitError):
    """A preset, YAML file or `--set` override that does not fit the schema."""


class DataError(MmlitError):
    """A dataset that is missing, malformed or unusable."""


class DataNotFound(DataError):
    """A named dataset whose files are not where they were looked for."""


class CheckpointError(MmlitError):
    """A checkpoint that cannot be read or does not fit what was asked of it."""


def listed(items: list[str], n: int = 5) -> str:
    """The first `n` of `items` for a message: "a, b, c and 4 more"."""
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def readable(text: str) -> str:
    """`text` with what cannot be written as UTF-8 shown as U+FFFD: a file or folder name that
    is not UTF-8 (from a Windows or legacy archive) reaches Python with its bytes as lone
    surrogates, which a terminal may print but matplotlib, TensorBoard and ONNX refuse."""
    if text.isascii():
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an undecodable byte
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def one_line(exc: BaseException, with_type: bool = True, limit: int | None = None, first_line: bool = False) -> str:
    """An exception as one line for a message: its text with white space folded (the type's
    name when it has none), after `Type: ` when `with_type`, cut to `limit` characters.
    `first_line`: only the text's first line, with the next when the first only introduces it
    ("backend='inductor' raised:"), for texts that go on with pages of advice."""
    name = type(exc).__name__
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if first_line:
        lines = lines[:2] if lines and lines[0].rstrip().endswith(":") else lines[:1]
    text = " ".join(" ".join(lines).split()) or name
    if with_type and text != name:
        text = f"{name}: {text}"
    if limit is not None and len(text) > limit:
        text = text[:limit - 3] + "..."
    return text
