"""Domains: a name, a tag token, where its data lives, and how a record becomes training text.

design.md §2: a training document is `<|bos|><|domain|>text<|eos|>`; asking for a domain means
starting generation from `<|bos|><|domain|>` plus an optional prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import UserError

Record = dict
Renderer = Callable[[Record, str], str]  # (record, location for errors) -> text


def _field(record: Record, name: str, kind: type, loc: str):
    if name not in record:
        raise UserError(f"{loc}: missing field '{name}' (expected {kind.__name__})")
    value = record[name]
    if not isinstance(value, kind):
        raise UserError(f"{loc}: field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _string_list(record: Record, name: str, loc: str) -> list[str]:
    items = _field(record, name, list, loc)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise UserError(f"{loc}: field '{name}[{i}]' must be str, got {type(item).__name__}")
    return [s.strip() for s in items if s.strip()]


def render_text(record: Record, loc: str) -> str:
    """Plain-text domains (stories): the record's `text` field, stripped."""
    return _field(record, "text", str, loc).strip()


RECIPE_FIELDS = ("title", "ingredients", "directions")


def render_recipe(record: Record, loc: str) -> str:
    """A recipe in the exact layout of design.md §2 (title, `- ` ingredients, numbered directions).

    Structured records are rendered from their fields. A record with none of the structured fields
    but a `text` (or hub-style `input`) string is taken as already rendered.
    """
    if not any(f in record for f in RECIPE_FIELDS):
        for name in ("text", "input"):
            if isinstance(record.get(name), str):
                return record[name].strip()
    title = _field(record, "title", str, loc).strip()
    ingredients = _string_list(record, "ingredients", loc)
    directions = _string_list(record, "directions", loc)
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


@dataclass(frozen=True)
class Domain:
    name: str
    render: Renderer
    hub_id: str | None = None  # default Hugging Face dataset id for online users
    train_file: str | None = None  # default file name under a local data dir (../shared/data)
    valid_file: str | None = None
    description: str = ""

    @property
    def tag(self) -> str:
        return f"<|{self.name}|>"


DOMAINS: dict[str, Domain] = {}


def register_domain(domain: Domain) -> Domain:
    """Add a domain (later issues add more than two); its tag becomes a special token of new tokenizers."""
    DOMAINS[domain.name] = domain
    return domain


register_domain(Domain("stories", render_text, hub_id="roneneldan/TinyStories",
                       train_file="tinystories.jsonl.gz", valid_file="tinystories.valid.jsonl.gz",
                       description="children's stories (TinyStories)"))
register_domain(Domain("recipes", render_recipe, hub_id="corbt/all-recipes",
                       train_file="recipes.jsonl.gz", valid_file="recipes.valid.jsonl.gz",
                       description="cooking recipes (all-recipes / RecipeNLG)"))


def get_domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise UserError(f"unknown domain '{name}' (known: {', '.join(sorted(DOMAINS))})") from None


def domain_tags() -> list[str]:
    return [d.tag for d in DOMAINS.values()]
