"""Routing: a free-text request ("write a recipe for banana bread") becomes a domain and a prompt.

design.md §2: the request is routed automatically and the decision is reported. The held-out
`DomainClassifier` scores the whole request; a short keyword rule decides first when the request
names its genre ("recipe", "story", ...), because a few words of topic are thin evidence and "a
story about a cake" is still a story. `Route.reason` says which of the two decided.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UserError
from .suite import DomainClassifier

# Instruction phrases that introduce the topic, and the genre each one asks for; the topic is what
# follows. They are searched anywhere ("could you please write me a recipe for ..."); the earliest wins.
_F = re.IGNORECASE
INSTRUCTIONS = [
    ("recipes", re.compile(r"\brecipes?\s+(?:for|of|with|on|to\s+(?:make|cook|bake))\s+", _F)),
    ("recipes", re.compile(r"\bhow\s+(?:do\s+(?:i|you|we)\s+|can\s+(?:i|you|we)\s+|should\s+i\s+|to\s+)?"
                           r"(?:cook|make|bake|prepare)\s+", _F)),
    ("stories", re.compile(r"\b(?:story|tale)\s+(?:about|of|where|in\s+which|featuring|with)\s+", _F)),
    ("stories", re.compile(r"^\s*once\s+upon\s+a\s+time,?\s*(?:there\s+(?:was|were|lived)\s+)?", _F)),
]
# Fallback: a bare leading verb ("bake me a chocolate cake", "write a banana bread recipe").
GENERIC = re.compile(r"^\s*(?:please\s+)?(?:(?:can|could|would)\s+you\s+)?(?:please\s+)?"
                     r"(?:write|give|make|tell|generate|create|show|share|bake|cook)(?:\s+(?:me|us))?\s+", _F)
# Genre nouns left around a topic: "a short story", "a banana bread recipe".
_GENRE_HEAD = re.compile(r"^(?:(?:a|an|some|another|one)\s+)?(?:(?:short|quick|simple|easy|good|nice|"
                         r"bedtime|fairy|funny|little|new)\s+)*(?:recipe|story|tale)s?\b\s*", _F)
_GENRE_TAIL = re.compile(r"\s*\b(?:recipe|story|tale)s?$", _F)
_TRAILER = re.compile(r"(?:[\s,]*\bplease)?[\s.!?,;:]*$", _F)

# Keyword prior, after the instruction phrase: words that name the genre asked for anywhere in the
# request. It decides only when exactly one domain's words occur ("bake me a cake", "a bread recipe").
KEYWORDS = {
    "recipes": re.compile(r"\b(?:recipes?|cook(?:s|ing)?|bak(?:e|es|ing)|ingredients?)\b", _F),
    "stories": re.compile(r"\b(?:stor(?:y|ies)|tales?|once\s+upon)\b", _F),
}


@dataclass
class Route:
    domain: str
    confidence: float          # the classifier's probability of `domain`; 1.0 when the rule decided
    prompt: str                # generation prompt after `<|bos|><|domain|>`
    scores: dict[str, float] = field(default_factory=dict)  # the classifier's probabilities, always
    reason: str = "classifier"


@dataclass
class Request:
    genre: str | None    # the domain the instruction phrase asks for, if it names one
    instruction: str     # the matched instruction phrase ("" when none)
    topic: str           # what the user wants the text to be about ("" when nothing is left)


def split_request(request: str) -> Request:
    """"Tell me a story about a brave cat!" -> Request("stories", "story about ", "a brave cat")."""
    found = [(m, genre) for genre, rx in INSTRUCTIONS if (m := rx.search(request))]
    if found:
        m, genre = min(found, key=lambda f: (f[0].start(), -f[0].end()))
    else:
        m, genre = GENERIC.search(request), None
    cut = m.end() if m else 0
    topic = _TRAILER.sub("", request[cut:].strip())
    topic = _GENRE_TAIL.sub("", _GENRE_HEAD.sub("", topic)).strip()
    return Request(genre, m.group(0) if m else "", topic)


# ---------------------------------------------------------------------------------------------------
# per-domain prompt builders

_ARTICLE = re.compile(r"^(?:a|an|some)\s+", _F)
_SMALL = {"a", "an", "and", "as", "at", "but", "by", "for", "from", "in", "into", "of", "on", "or",
          "the", "to", "with"}


def recipe_prompt(topic: str) -> str:
    """A recipe starts with its title: "a banana bread" -> "Banana Bread" (small words stay lower case
    inside a title, as in the corpus: "Chicken with Rice")."""
    words = _ARTICLE.sub("", topic).split()
    return " ".join(w if i and w.lower() in _SMALL else w[:1].upper() + w[1:] for i, w in enumerate(words))


_THERE_WAS = re.compile(r"^(?:once\s+upon\s+a\s+time,?\s*)?(?:there\s+(?:was|were|lived)\s+)?", _F)


def story_prompt(topic: str) -> str:
    """TinyStories open with "Once upon a time, there was ...": the topic fills the blank, without
    repeating an opening the user already wrote ("there was a cat" -> "... there was a cat.")."""
    topic = _THERE_WAS.sub("", topic).strip()
    return f"Once upon a time, there was {topic}." if topic else ""


PROMPT_BUILDERS = {"recipes": recipe_prompt, "stories": story_prompt}  # other domains: the topic as is


def route(request: str, classifier: DomainClassifier) -> Route:
    """Pick the domain for a free-text request and build its generation prompt. The decision goes to
    the instruction phrase's genre, else to a lone genre keyword, else to the classifier."""
    if not request.strip():
        raise UserError("empty request; say what to write, e.g. 'a recipe for banana bread'")
    scores = classifier.predict_proba([request])[0]
    parsed = split_request(request)
    top = max(scores, key=scores.get)
    domain, confidence, reason = top, scores[top], "classifier"
    hits = {d: m.group(0) for d, rx in KEYWORDS.items() if d in scores and (m := rx.search(request))}
    if parsed.genre in scores:
        domain, rule = parsed.genre, f"instruction '{parsed.instruction.strip()}'"
    elif len(hits) == 1:
        [(domain, word)] = hits.items()
        rule = f"keyword '{word}'"
    else:
        rule = None
    if rule:
        confidence, reason = 1.0, f"{rule} (classifier alone: {top} {scores[top]:.2f})"
    build = PROMPT_BUILDERS.get(domain, lambda topic: topic)
    return Route(domain, confidence, build(parsed.topic), scores, reason)


ROUTER_FILE = "router.joblib"
ROUTER_DOCS = 2000  # real training documents per domain for a model's router


def load_router(served) -> DomainClassifier | None:
    """The request router of a served model: `router.joblib` in its folder, trained on first use from
    the real training text of the domains the model serves (its run record names the files), so it
    exists for every model whatever its strategy. None for a single-domain model."""
    from .artifacts import read_json
    from .corpus import load_corpus
    from .domains import get_domain

    domains = served.domains
    if len(domains) < 2:
        return None
    path = served.path / ROUTER_FILE
    if path.exists():
        return DomainClassifier.load(path)
    data = read_json(served.path / "run.json", "run record").get("domain_data", {})
    missing = [d for d in domains if d not in data]
    if missing:
        raise UserError(f"{served.path / 'run.json'}: field 'domain_data' lacks {', '.join(missing)}; "
                        "cannot train a request router")
    texts = {d: load_corpus(data[d]["train"], get_domain(d), limit=ROUTER_DOCS).documents for d in domains}
    router = DomainClassifier().fit(texts, seed=0)
    router.save(path)
    return router


def route_request(request: str, served) -> Route:
    """Route for a served model: its router, or its single domain."""
    router = load_router(served)
    if router is None:
        domain = served.domains[0] if served.domains else None
        if domain is None:
            raise UserError(f"{served.path}: no expandlm.json saying which domains it serves; use --domain")
        topic = split_request(request).topic
        return Route(domain, 1.0, PROMPT_BUILDERS.get(domain, lambda t: t)(topic), {domain: 1.0},
                     "the model serves one domain")
    return route(request, router)
