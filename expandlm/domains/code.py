"""Python functions (CPython's standard library): the source as written; a request becomes a signature."""
import ast
import re

from . import Domain, register_domain

_VERBATIM = re.compile(r"^\s*(?:@|def\s|async\s+def\s)")


def parses(text: str) -> bool:
    """A generated function is valid when it parses as Python (design.md §6)."""
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: a NUL byte in the source
        return False
    return True


def code_prompt(topic: str) -> str:
    """A signature is taken as it is ("def flatten(items):" -> itself, on a line of its own); any other
    topic names the function: "flattens a nested list" -> "def flatten_nested_list("."""
    if _VERBATIM.match(topic):
        topic = topic.strip()
        return topic + "\n" if topic.endswith(":") else topic
    words = [w for w in re.findall(r"[a-z0-9]+", topic.lower()) if w not in ("a", "an", "the")]
    if words and len(words[0]) > 3 and words[0].endswith("s") and not words[0].endswith("ss"):
        words[0] = words[0][:-1]  # "flattens a list" -> flatten_list: functions are named by the imperative
    return f"def {'_'.join(words)}(" if words else ""


CODE = register_domain(Domain(
    name="code",
    description="Python functions (CPython's standard library)",
    train_file="code.jsonl.gz", valid_file="code.valid.jsonl.gz",
    nouns=("function", "method"),
    keywords=r"\b(?:functions?|methods?|python|def)\b",
    instructions=(r"\b(?:function|method)\s+(?:that|which|to|for)\s+",),
    prompt=code_prompt,
    check=parses, check_name="parses (ast.parse)",
    demo_request="a function that returns the largest of three numbers",
))
