"""Domains: everything expandlm knows about a kind of text lives on its `Domain`, one file each.

design.md §2: a training document is `<|bos|><|domain|>text<|eos|>`; asking for a domain means
starting generation from `<|bos|><|domain|>` plus a prompt. Training, evaluation, routing, the study
and the demo iterate over domains and never name one; adding a domain means adding a file here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from ..errors import UserError

Record = dict
Renderer = Callable[[Record, str], str]  # (record, location for errors) -> text


def field(record: Record, name: str, kind: type, loc: str):
    """`record[name]`, checked to be a `kind`; the error names the location and the field."""
    if name not in record:
        raise UserError(f"{loc}: missing field '{name}' (expected {kind.__name__})")
    value = record[name]
    if not isinstance(value, kind):
        raise UserError(f"{loc}: field '{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def string_list(record: Record, name: str, loc: str) -> list[str]:
    items = field(record, name, list, loc)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise UserError(f"{loc}: field '{name}[{i}]' must be str, got {type(item).__name__}")
    return [s.strip() for s in items if s.strip()]


def render_text(record: Record, loc: str) -> str:
    """Plain-text domains: the record's `text` field, stripped."""
    return field(record, "text", str, loc).strip()


def as_is(topic: str) -> str:
    return topic


@dataclass(frozen=True)
class Domain:
    name: str
    render: Renderer = render_text          # a record → its training text
    description: str = ""
    # where the data lives: a Hugging Face dataset for online users, file names under a local data dir
    hub_id: str | None = None
    hub_val_split: str | None = None        # the hub dataset's validation split (None: hold out 1%)
    train_file: str | None = None
    valid_file: str | None = None
    # requests: what the genre is called, words that ask for it, phrases that introduce a topic
    nouns: tuple[str, ...] = ()             # "recipe", "story": stripped from a request's topic
    keywords: str = ""                      # regex: a word in a request that asks for this domain
    instructions: tuple[str, ...] = ()      # regexes: "a recipe for ", "a story about "; the topic follows
    prompt: Callable[[str], str] = as_is    # a request's topic → the generation prompt
    # generated text: a structural check of a finished sample (None: no structure to check)
    check: Callable[[str], bool] | None = None
    check_name: str = ""
    demo_request: str = ""                  # a free-text request the demo routes and answers

    @property
    def tag(self) -> str:
        return f"<|{self.name}|>"

    def valid(self, text: str, finished: bool) -> bool:
        """A sample passes the structural check only if it also ended before the length limit."""
        return bool(finished and self.check is not None and self.check(text))

    def keyword_match(self, request: str) -> re.Match | None:
        return re.search(self.keywords, request, re.IGNORECASE) if self.keywords else None


DOMAINS: dict[str, Domain] = {}


def register_domain(domain: Domain) -> Domain:
    """Make a domain known by name; its tag becomes a special token of tokenizers trained after."""
    DOMAINS[domain.name] = domain
    return domain


def get_domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise UserError(f"unknown domain '{name}' (known: {', '.join(sorted(DOMAINS))})") from None


def domain_tags() -> list[str]:
    return [d.tag for d in DOMAINS.values()]


# The built-in domains, one file each; importing them registers them.
from . import stories, recipes, code  # noqa: E402,F401  (in this order: the paper's, then the third)
