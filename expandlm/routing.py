"""Routing: a free-text request ("write a recipe for banana bread") becomes a domain and a prompt.

design.md §2: the request is routed automatically and the decision is reported. The held-out
`DomainClassifier` scores the whole request; a rule decides first when the request names its genre
with one of the domains' own instruction phrases or keywords (`Domain.instructions`, `.keywords`),
because a few words of topic are thin evidence and "a story about a cake" is still a story.
`Route.reason` says which of the two decided. The topic becomes a prompt by the domain's `prompt`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .domains import DOMAINS, get_domain
from .errors import UserError
from .run_folder import ROUTER, RUN_RECORD, is_main_process
from .suite import DomainClassifier

# Grammar shared by every domain; what names a domain in a request lives on the domain
# (`Domain.instructions`, `.keywords`, `.nouns`). Instruction phrases are searched anywhere ("could you
# please write me a recipe for ..."); the earliest wins.
_F = re.IGNORECASE
# Fallback: a bare leading verb ("bake me a chocolate cake", "write a banana bread recipe").
GENERIC = re.compile(r"^\s*(?:please\s+)?(?:(?:can|could|would)\s+you\s+)?(?:please\s+)?"
                     r"(?:write|give|make|tell|generate|create|show|share|bake|cook)(?:\s+(?:me|us))?\s+", _F)
_ADJECTIVES = r"(?:(?:short|quick|simple|easy|good|nice|bedtime|fairy|funny|little|new)\s+)*"
_TRAILER = re.compile(r"(?:[\s,]*\bplease)?[\s.!?,;:]*$", _F)


def _nouns(domains) -> str:
    return "|".join(re.escape(n) for d in domains for n in d.nouns) or r"(?!)"


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


def split_request(request: str, domains=None) -> Request:
    """"Tell me a story about a brave cat!" -> Request("stories", "story about ", "a brave cat").
    `domains`: the domains whose phrases count (default: every registered domain)."""
    domains = list(DOMAINS.values()) if domains is None else domains
    found = [(m, d.name) for d in domains for rx in d.instructions if (m := re.search(rx, request, _F))]
    if found:
        m, genre = min(found, key=lambda f: (f[0].start(), -f[0].end()))
    else:
        m, genre = GENERIC.search(request), None
    cut = m.end() if m else 0
    topic = _TRAILER.sub("", request[cut:].strip())
    nouns = _nouns(domains)
    head = rf"^(?:(?:a|an|some|another|one)\s+)?{_ADJECTIVES}(?:{nouns})s?\b\s*"  # "a short story"
    tail = rf"\s*\b(?:{nouns})s?$"                                               # "banana bread recipe"
    topic = re.sub(tail, "", re.sub(head, "", topic, flags=_F), flags=_F).strip()
    return Request(genre, m.group(0) if m else "", topic)


def route(request: str, classifier: DomainClassifier) -> Route:
    """Pick the domain for a free-text request and build its generation prompt. The decision goes to
    the instruction phrase's genre, else to a lone genre keyword, else to the classifier."""
    if not request.strip():
        raise UserError("empty request; say what to write, e.g. 'a recipe for banana bread'")
    scores = classifier.predict_proba([request])[0]
    domains = [get_domain(d) for d in scores]
    parsed = split_request(request, domains)
    top = max(scores, key=scores.get)
    domain, confidence, reason = top, scores[top], "classifier"
    hits = {d.name: m.group(0) for d in domains if (m := d.keyword_match(request))}
    if parsed.genre in scores:
        domain, rule = parsed.genre, f"instruction '{parsed.instruction.strip()}'"
    elif len(hits) == 1:
        [(domain, word)] = hits.items()
        rule = f"keyword '{word}'"
    else:
        rule = None
    if rule:
        confidence, reason = 1.0, f"{rule} (classifier alone: {top} {scores[top]:.2f})"
    return Route(domain, confidence, get_domain(domain).prompt(parsed.topic), scores, reason)


ROUTER_DOCS = 2000  # real training documents per domain for a model's router


def load_router(served) -> DomainClassifier | None:
    """The request router of a served model: `router.joblib` in its folder, trained on first use from
    the real training text of the domains the model serves (its run record names the files), so it
    exists for every model whatever its strategy. None for a single-domain model."""
    from .corpus import load_corpus

    domains = served.domains
    if len(domains) < 2:
        return None
    path = served.folder / ROUTER
    if path.exists():
        return DomainClassifier.load(path)
    data = served.domain_data()
    missing = [d for d in domains if d not in data]
    if missing:
        raise UserError(f"{served.folder / RUN_RECORD}: field 'domain_data' lacks {', '.join(missing)}; "
                        "cannot train a request router")
    texts = {d: load_corpus(data[d]["train"], get_domain(d), limit=ROUTER_DOCS).documents for d in domains}
    router = DomainClassifier().fit(texts, seed=0)
    if is_main_process():
        router.save(path)
    return router


def route_request(request: str, served) -> Route:
    """Route for a served model: its router, or its single domain."""
    router = load_router(served)
    if router is None:
        if not served.domains:
            raise UserError(f"{served.path}: no expandlm.json saying which domains it serves; use --domain")
        domain = get_domain(served.domains[0])
        topic = split_request(request, [domain]).topic
        return Route(domain.name, 1.0, domain.prompt(topic), {domain.name: 1.0}, "the model serves one domain")
    return route(request, router)
