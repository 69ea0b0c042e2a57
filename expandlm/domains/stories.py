"""Children's stories (TinyStories): plain text; a request's topic fills a TinyStories opening."""
import re

from . import Domain, register_domain

_THERE_WAS = re.compile(r"^(?:once\s+upon\s+a\s+time,?\s*)?(?:there\s+(?:was|were|lived)\s+)?", re.IGNORECASE)


def story_prompt(topic: str) -> str:
    """TinyStories open with "Once upon a time, there was ...": the topic fills the blank, without
    repeating an opening the user already wrote ("there was a cat" -> "... there was a cat.")."""
    topic = _THERE_WAS.sub("", topic).strip()
    return f"Once upon a time, there was {topic}." if topic else ""


STORIES = register_domain(Domain(
    name="stories",
    description="children's stories (TinyStories)",
    hub_id="roneneldan/TinyStories", hub_val_split="validation",
    train_file="tinystories.jsonl.gz", valid_file="tinystories.valid.jsonl.gz",
    nouns=("story", "tale"),
    keywords=r"\b(?:stor(?:y|ies)|tales?|once\s+upon)\b",
    instructions=(r"\b(?:story|tale)\s+(?:about|of|where|in\s+which|featuring|with)\s+",
                  r"^\s*once\s+upon\s+a\s+time,?\s*(?:there\s+(?:was|were|lived)\s+)?"),
    prompt=story_prompt,
    demo_request="Tell me a story about a little fox who finds a shiny stone",
))
