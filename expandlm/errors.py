"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a field). The message says where and what was expected."""


def where(path, line=None, field=None) -> str:
    """Format a location such as `data.jsonl:12: field 'title'` for error messages."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field is not None:
        loc += f": field '{field}'"
    return loc


class Stopped(Exception):
    """A run stopped on request (SIGINT, SIGTERM) after saving where `--resume` continues it. The CLI
    prints the message as one line and exits with 128 + `signum`, as a shell reports a signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def no_space_left(e: BaseException) -> bool:
    """Whether `e` is a full disk: an OSError, or a library's own error wrapping one (safetensors)."""
    import errno
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)
