"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a field). The message says where and what was expected."""


def did_you_mean(name: str, known) -> str:
    """ "; did you mean 'stories'?" for a misspelt name, or "" when no known name is close."""
    import difflib
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def unknown(kind: str, name: str, known, more: str = "") -> UserError:
    """The error for a name that is none of `known`: `unknown domain 'storys'; did you mean 'stories'?
    (known: recipes, stories)`; `more` is added inside the parenthesis."""
    return UserError(f"unknown {kind} '{name}'{did_you_mean(name, known)} (known: {', '.join(map(str, known))}{more})")


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
