"""The structural checks a domain spec can name (`check: recipe_layout`): the part of a domain that is
code, because a layout with counted steps or a parse is more than a regex can say."""
import ast
import re

_BULLET = re.compile(r"- \S")
_STEP = re.compile(r"(\d+)\. \S")


def recipe_layout(text: str) -> bool:
    """True when `text` has the recipe layout of docs/DESIGN.md, "Metrics":

        <title>               a non-empty first line that is not a section header
        (blank lines)
        Ingredients:
        - <ingredient>        at least two, one per line, no gaps
        (blank lines)
        Directions:
        1. <step>             at least one; numbered 1, 2, 3, ... in order, nothing after them

    Trailing whitespace on any line and at the end is ignored; a missing or reordered section is not.
    Steps must count up from 1: a model that writes "1. 3. 2." has not learned the layout.
    """
    lines = [line.rstrip() for line in text.rstrip().split("\n")]
    headers = ("Ingredients:", "Directions:")
    if not lines[0] or lines[0] in headers:
        return False
    i = 1

    def skip_blank() -> None:
        nonlocal i
        while i < len(lines) and not lines[i]:
            i += 1

    skip_blank()
    if i >= len(lines) or lines[i] != "Ingredients:":
        return False
    i += 1
    start = i
    while i < len(lines) and _BULLET.match(lines[i]):
        i += 1
    if i - start < 2:
        return False
    skip_blank()
    if i >= len(lines) or lines[i] != "Directions:":
        return False
    steps = lines[i + 1:]
    if not steps:
        return False
    for n, line in enumerate(steps, 1):
        m = _STEP.match(line)
        if not m or int(m.group(1)) != n:
            return False
    return True


def python_parses(text: str) -> bool:
    """A generated function is valid when it parses as Python (docs/DESIGN.md, "Metrics")."""
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return False
    return True


# the names a domain spec's `check:` may give
CHECKS = {"recipe_layout": recipe_layout, "python_parses": python_parses}
