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
