"""Cooking recipes (all-recipes / RecipeNLG): a title, `- ` ingredients and numbered directions."""
import re

from ..errors import UserError
from . import Domain, Record, field, register_domain, string_list

FIELDS = ("title", "ingredients", "directions")


def render_recipe(record: Record, loc: str) -> str:
    """A recipe in the exact layout of design.md §2 (title, `- ` ingredients, numbered directions).

    Structured records are rendered from their fields. A record with none of the structured fields
    but a `text` (or hub-style `input`) string is taken as already rendered.
    """
    if not any(f in record for f in FIELDS):
        for name in ("text", "input"):
            if isinstance(record.get(name), str):
                return record[name].strip()
    title = field(record, "title", str, loc).strip()
    ingredients = string_list(record, "ingredients", loc)
    directions = string_list(record, "directions", loc)
    if not title:
        raise UserError(f"{loc}: field 'title' is empty")
    if not ingredients:
        raise UserError(f"{loc}: field 'ingredients' has no non-empty item")
    if not directions:
        raise UserError(f"{loc}: field 'directions' has no non-empty item")
    lines = [title, "", "Ingredients:"]
    lines += [f"- {item}" for item in ingredients]
    lines += ["", "Directions:"]
    lines += [f"{i}. {step}" for i, step in enumerate(directions, 1)]
    return "\n".join(lines)


_BULLET = re.compile(r"- \S")
_STEP = re.compile(r"(\d+)\. \S")


def recipe_layout(text: str) -> bool:
    """True when `text` has the layout of design.md §2:

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


_ARTICLE = re.compile(r"^(?:a|an|some)\s+", re.IGNORECASE)
_SMALL = {"a", "an", "and", "as", "at", "but", "by", "for", "from", "in", "into", "of", "on", "or",
          "the", "to", "with"}


def recipe_prompt(topic: str) -> str:
    """A recipe starts with its title: "a banana bread" -> "Banana Bread" (small words stay lower case
    inside a title, as in the corpus: "Chicken with Rice")."""
    words = _ARTICLE.sub("", topic).split()
    return " ".join(w if i and w.lower() in _SMALL else w[:1].upper() + w[1:] for i, w in enumerate(words))


RECIPES = register_domain(Domain(
    name="recipes",
    render=render_recipe,
    description="cooking recipes (all-recipes / RecipeNLG)",
    hub_id="corbt/all-recipes",  # a train split only: its validation set is a held-out slice
    train_file="recipes.jsonl.gz", valid_file="recipes.valid.jsonl.gz",
    nouns=("recipe",),
    keywords=r"\b(?:recipes?|cook(?:s|ing)?|bak(?:e|es|ing)|ingredients?)\b",
    instructions=(r"\brecipes?\s+(?:for|of|with|on|to\s+(?:make|cook|bake))\s+",
                  r"\bhow\s+(?:do\s+(?:i|you|we)\s+|can\s+(?:i|you|we)\s+|should\s+i\s+|to\s+)?"
                  r"(?:cook|make|bake|prepare)\s+"),
    prompt=recipe_prompt,
    check=recipe_layout, check_name="recipe layout",
    demo_request="Write a recipe for banana bread",
))
