"""Routing: a free-text request ("write a recipe for banana bread") becomes a domain and a prompt.

The request is routed automatically and the decision and its confidence are reported (docs/DESIGN.md,
"Routing").
Nothing here names a domain or lists a domain's words: a router is learned from each domain's own
data (its training documents, its genre `nouns`, its `prompt`). Three kinds (`ROUTERS`), measured
against each other by `benchmarks/routing_accuracy.py` on hand-written requests:

- `documents`: the TF-IDF `DomainClassifier` trained on the domains' training documents only.
- `requests`: the same classifier trained on those documents plus requests synthesised
  from them: generic templates ("write a {noun} about {x}", "{x} {noun}", "{x}") filled with a
  domain's noun and a topic cut from any domain's documents, labelled by the noun's domain, or by the
  topic's when the template has no noun. It learns that the genre noun decides ("a story about a
  chef") and that the topic decides alone when there is none ("chocolate chip cookies").
- `vocabulary` (the default): the `requests` classifier, and, for a request that names no genre noun,
  its product with each domain's own `Vocabulary` (a naive Bayes over the content words of the
  domain's documents): a plain question ("how do I get a crispy crust on roast potatoes") is read by
  its content words, a cooking verb and a dish being recipe words whatever the phrasing.
- `likelihood`: the served model itself: the topic as each domain's prompt, scored under
  `<|bos|><|domain|>` by that domain's view and tokenizer; softmax over negated bits per byte.
- `combined`: the product of the `requests` and `likelihood` probabilities.

A request none of the domains fits ("asdf qwerty") keeps its best guess but is flagged (`Route.fits`):
its top probability is below the router's `threshold`, the confidence that all but `MISS_SHARE` of
held-out synthesised requests reach (calibrated from data at training time), or none of its words
occurs in the training text. How each router fares, and what it misses, is in docs/RESULTS.md
("Routing").

    router = router_from_data(served.domain_data())   # each domain's recorded training data
    route(request, router)   # Route(domain, confidence, scores, reason, prompt, fits)
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_path
from ..domains import DOMAINS, get_domain
from ..errors import UserError
from ..records import DomainSource
from ..run_folder import RUN_RECORD, is_main_process
from .classifier import DomainClassifier

# -- reading a request: generic English, the same for every domain ------------------------------------
_F = re.IGNORECASE
# A leading request verb ("can you please write me", "bake me", "how do I make", "I'd like").
GENERIC = re.compile(r"^\s*(?:please\s+)?(?:(?:can|could|would|will)\s+you\s+)?(?:please\s+)?"
                     r"(?:(?:how\s+(?:do|can|should|would)\s+(?:i|you|we)\s+|how\s+to\s+)?"
                     r"(?:write|give|make|tell|generate|create|show|share|bake|cook|prepare|implement|code)"
                     r"(?:\s+(?:me|us))?(?:\s+up)?\s+|i(?:'d|\s+would)\s+like\s+|i\s+(?:want|need)\s+)", _F)
_ARTICLE = r"(?:a|an|some|another|one|the)\s+"
_ADJECTIVES = r"(?:(?:short|long|quick|simple|easy|good|nice|great|funny|little|new|small|random)\s+)*"
# what introduces the topic after a genre noun: "story about", "recipe for", "function that", "tale: "
_CONNECTIVE = re.compile(r"^\s*(?::\s*|(?:about|of|for|with|on|where|in\s+which|featuring|that|which|to|"
                         r"who|using)\s+)", _F)


MAX_REQUEST_CHARS = 16_384  # a request is a line or a paragraph; the longest prompt of any model here is shorter
_TRAILING = frozenset(".!?,;")  # not ':': "def f(x):" keeps it


def check_length(request: str) -> None:
    """A request longer than `MAX_REQUEST_CHARS` is refused before it is read: routing and parsing
    cost time in its length, and no model here has a context that long."""
    if len(request) > MAX_REQUEST_CHARS:
        raise UserError(f"the request is {len(request)} characters; the limit is {MAX_REQUEST_CHARS}")


def strip_trailer(text: str) -> str:
    """`text` without its closing punctuation and a last "please" ("a pie, please!" -> "a pie"). A scan
    from the end, linear in the length: the regex it replaces, `(?:[\\s,]*\\bplease)?[\\s.!?,;]*$`,
    tried every start of a run of spaces and took the square of the run's length (72 KB: 68 s)."""
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] in _TRAILING):
        end -= 1
    word = end - 6
    if word >= 0 and text[word:end].casefold() == "please" and not (word and _word_char(text[word - 1])):
        end = word
        while end and (text[end - 1].isspace() or text[end - 1] == ","):
            end -= 1
    return text[:end]


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"  # what \w is to `re` on str


@dataclass
class Request:
    genre: str | None    # the domain whose genre noun the request names first, if any
    instruction: str     # the text before the topic ("write me a recipe for "; "" when none)
    topic: str           # what the user wants the text to be about ("" when nothing is left)


def _first_noun(text: str, domains) -> re.Match | None:
    nouns = [n for d in domains for n in d.nouns]
    return re.search(rf"\b({'|'.join(map(re.escape, nouns))})s?\b", text, _F) if nouns else None


def split_request(request: str, domains=None) -> Request:
    """"Tell me a story about a brave cat!" -> Request("stories", "Tell me a story about ", "a brave cat").
    `domains`: the domains whose `nouns` count (default: every registered domain)."""
    check_length(request)
    domains = list(DOMAINS.values()) if domains is None else list(domains)
    text = strip_trailer(request.strip())
    lead = GENERIC.search(text)
    rest = text[lead.end():] if lead else text
    nouns = {n.lower(): d.name for d in domains for n in d.nouns}
    m = _first_noun(rest, domains)
    if not m:
        return Request(None, text[:len(text) - len(rest)], rest.strip())
    genre, before, after = nouns[m.group(1).lower()], rest[:m.start()], rest[m.end():]
    if c := _CONNECTIVE.match(after):  # "a funny story about a cat": the topic follows the connective
        return Request(genre, text[:len(text) - len(after) + c.end()], after[c.end():].strip())
    # "a banana bread recipe", "a pancake recipe without eggs", "write a short story"
    before = re.sub(rf"^(?:{_ARTICLE})?{_ADJECTIVES}", "", before, flags=_F)
    return Request(genre, text[:len(text) - len(rest)], f"{before} {after}".strip())


# -- synthesised requests ------------------------------------------------------------------------------
# Written once for every domain: {noun} is a genre noun of the label's domain, {x} a topic of any domain.
TEMPLATES = (
    "write a {noun} about {x}", "a {noun} about {x}", "{noun} for {x}", "{x} {noun}", "a {x} {noun}",
    "can you give me a {noun} with {x}", "tell me a {noun} about {x}", "give me a {noun} for {x}",
    "I want a {noun} of {x}", "please write a short {noun} on {x}", "{noun}: {x}", "{noun} about {x}",
    "could you make me a {noun} featuring {x}", "I need a {noun} where {x}", "a {noun} that {x}",
    "write me a {noun} with {x} please", "any good {noun}s for {x}?", "show me a {noun} to {x}",
    "a simple {noun}", "write a {noun}", "{noun}s with {x}", "create a {noun} using {x}",
)
BARE = ("{x}", "{x} please", "make {x}", "write {x}", "I want {x}", "something like {x}",
        "how do I {x}?", "{x}.")  # no noun: the topic decides
_PROSE = re.compile(r"[\"'#\s]*(?:[A-Za-z][a-z]*[,.;:!?]?\s+){3,}[A-Za-z][a-z]*[,.;:!?\"']*")  # 4+ plain words
_WORDS = re.compile(r"[A-Za-z][a-z]+|[A-Z]+(?![a-z])|\d+")  # "parseHTTPHeader_v2" -> parse HTTP Header v 2


def topics(document: str, rng: random.Random, k: int = 2) -> list[str]:
    """Short topics cut from a document, the same way for every domain: its first line when short (a
    recipe title, a signature), that line as plain words (identifiers split: "def merge_sorted(a, b):"
    -> "def merge sorted a b") and a few 2-7 word spans of its lines, preferably from an article on
    ("a little cherry tree who ..."), of its prose lines when it has some."""
    lines = [ln.strip() for ln in document.splitlines() if ln.strip()]
    if not lines:
        return []
    out = []
    if len(lines[0].split()) <= 10:
        out += [lines[0], " ".join(_WORDS.findall(lines[0])).lower()]
    prose = [ln for ln in lines if _PROSE.fullmatch(ln)] or lines  # a docstring, a step, a sentence
    for _ in range(k):
        words = rng.choice(prose).split()
        starts = [i for i, w in enumerate(words) if w.lower() in ("a", "an", "the")] or range(len(words))
        i = rng.choice(list(starts))
        span = " ".join(words[i:i + rng.randint(2, 7)]).strip(" .,;:!?\"'")
        if span:
            out.append(span)
    return out


def synthesise(documents: dict[str, list[str]], nouns: dict[str, tuple[str, ...]], per_domain: int,
               seed: int = 0) -> dict[str, list[str]]:
    """`per_domain` requests labelled with each domain: half name its noun (the topic from any
    domain, so the noun must win over the topic), half are bare topics of its own documents."""
    rng = random.Random(seed)
    pools = {d: [t for doc in docs for t in topics(doc, rng)] for d, docs in sorted(documents.items())}
    out = {}
    for d, pool in pools.items():
        named = [rng.choice(TEMPLATES).format(noun=rng.choice(nouns[d]), x=rng.choice(pools[rng.choice(list(pools))]))
                 for _ in range(per_domain // 2 if nouns.get(d) else 0)]
        bare = [rng.choice(BARE).format(x=rng.choice(pool)) for _ in range(per_domain - len(named))]
        out[d] = named + bare
    return out


# -- routers -------------------------------------------------------------------------------------------
TRAINED_ROUTERS = ("documents", "requests", "vocabulary")  # trained from documents by `train_router`
ROUTERS = (*TRAINED_ROUTERS, "likelihood", "combined")
DEFAULT_ROUTER = "vocabulary"  # the best measured (benchmarks/results/routing_accuracy.md)
ROUTER_DOCS = 1000            # classifier's training documents per domain (more costs time, not accuracy)
VOCABULARY_DOCS = 10_000      # documents per domain a vocabulary counts words in (a rarer word is known)
SYNTH_REQUESTS = 3000         # synthesised requests per domain
MISS_SHARE = 0.02             # held-out in-domain requests a threshold may flag as fitting no domain
FORMAT = "expandlm-router-2"  # 2: the vocabulary router


def content_words(text: str) -> list[str]:
    """A text's content words, read the same way for every domain: lowercased words, identifiers split
    ("readLines", "read_lines" -> read, lines), without numbers or English function words
    (scikit-learn's generic stop list: "how", "do", "I", "a" say nothing of a domain)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    return [w for w in map(str.lower, _WORDS.findall(text)) if not w.isdigit() and w not in ENGLISH_STOP_WORDS]


class Vocabulary:
    """Each domain's own vocabulary: a naive Bayes over which content words its documents hold (each
    word once per document; uniform prior), the posterior of a request's content words over the
    domains. A request with no known content word gets no score (None). Chosen on requests synthesised
    from held-out documents (no genre noun: 97.9% routed right; the mean log-probability per word or
    TF-IDF weights did no better, and the `requests` classifier alone 95.4%)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    @classmethod
    def fit(cls, documents: dict[str, list[str]]) -> "Vocabulary":
        from sklearn.feature_extraction.text import CountVectorizer
        from sklearn.naive_bayes import MultinomialNB
        from sklearn.pipeline import Pipeline
        texts = [t for docs in documents.values() for t in docs]
        labels = [d for d, docs in documents.items() for _ in docs]
        pipeline = Pipeline([("words", CountVectorizer(analyzer=content_words, min_df=2, binary=True)),
                             ("bayes", MultinomialNB(fit_prior=False))])
        return cls(pipeline.fit(texts, labels))

    def scores(self, requests: list[str]) -> list[dict[str, float] | None]:
        known = self.pipeline.named_steps["words"].transform(requests).getnnz(axis=1)
        probs = self.pipeline.predict_proba(requests)
        return [{str(d): float(p) for d, p in zip(self.pipeline.classes_, row)} if n else None
                for row, n in zip(probs, known)]


@dataclass
class Router:
    """A trained request router: a classifier over whole requests, each domain's vocabulary (the
    `vocabulary` kind) and its no-domain threshold."""
    kind: str
    classifier: DomainClassifier
    threshold: float = 0.0
    train_seconds: float = 0.0
    vocabulary: Vocabulary | None = None
    known: dict = field(default_factory=dict, repr=False)  # a model folder's own domains by name (not saved)

    @property
    def domains(self) -> list[str]:
        return self.classifier.domains

    def scores(self, requests: list[str]) -> list[dict[str, float]]:
        """The classifier's probabilities; with a vocabulary, times the vocabulary's for a request that
        names no genre noun (one that does is decided as the classifier learned: the noun wins)."""
        probs = self.classifier.predict_proba(requests if self.kind == "documents" else marked(requests, self.domains, self.known))
        if self.vocabulary is None:
            return probs
        domains = [get_domain(d, self.known) for d in self.domains]
        return [p if v is None or _first_noun(r, domains) else _product([p, v])
                for r, p, v in zip(requests, probs, self.vocabulary.scores(requests))]

    def knows(self, request: str) -> bool:
        """Whether any word of the request occurs in the training text ("asdf qwerty": none does)."""
        words = self.classifier.pipeline.named_steps["features"].transformer_list[0][1]
        return words.transform([request]).nnz > 0

    def save(self, path) -> Path:
        import joblib
        with atomic_path(path) as tmp:
            joblib.dump({"format": FORMAT, "kind": self.kind, "threshold": self.threshold,
                         "train_seconds": self.train_seconds, "pipeline": self.classifier.pipeline,
                         "vocabulary": self.vocabulary and self.vocabulary.pipeline,
                         "domains": self.classifier.domains, "per_domain": self.classifier.per_domain}, tmp)
        return Path(path)

    @classmethod
    def load(cls, path) -> "Router | None":
        """None for a file of another format (an older expandlm's router): the caller retrains it."""
        import joblib
        try:
            state = joblib.load(path)
        except Exception as e:  # pickle raises many types for truncated or foreign files
            raise UserError(f"{path}: not a readable router file ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            return None
        clf = DomainClassifier()
        clf.pipeline, clf.domains, clf.per_domain = state["pipeline"], list(state["domains"]), state["per_domain"]
        vocabulary = Vocabulary(state["vocabulary"]) if state.get("vocabulary") is not None else None
        return cls(state["kind"], clf, state["threshold"], state.get("train_seconds", 0.0), vocabulary)


def marked(requests: list[str], domains, known=None) -> list[str]:
    """Each request with a word for the genre noun it names first ("a function that tells a story" ->
    "... genre_function"): a bag of words cannot see which noun came first, and the first one is
    the genre asked for. The classifier learns what the word means from the synthesised requests."""
    domains = [get_domain(d, known) for d in domains]
    out = []
    for r in requests:
        m = _first_noun(r, domains)
        out.append(f"{r} genre_{m.group(1).lower()}" if m else r)
    return out


def calibrate(router, requests_by_domain: dict[str, list[str]], miss_share: float = MISS_SHARE) -> float:
    """The no-domain threshold: the top probability that all but `miss_share` of these in-domain
    requests reach (held-out ones: never the requests a router is evaluated on)."""
    tops = sorted(max(s.values()) for reqs in requests_by_domain.values() for s in router.scores(reqs))
    return tops[int(miss_share * len(tops))] if tops else 0.0


def train_router(documents: dict[str, list[str]], kind: str = DEFAULT_ROUTER, seed: int = 0, known=None) -> Router:
    """A classifier router (one of `TRAINED_ROUTERS`) from each domain's training documents: the
    classifier reads the first `ROUTER_DOCS`, of which the last tenth is held out to synthesise the
    requests that set its threshold; a vocabulary counts the words of all the others."""
    import time
    if kind not in TRAINED_ROUTERS:
        raise UserError(f"router '{kind}' is not trained from documents (trained kinds: {', '.join(TRAINED_ROUTERS)})")
    start = time.perf_counter()
    first = {d: docs[:ROUTER_DOCS] for d, docs in documents.items()}
    train = {d: docs[:max(1, len(docs) * 9 // 10)] for d, docs in first.items()}
    held = {d: docs[len(train[d]):] or docs for d, docs in first.items()}
    nouns = {d: get_domain(d, known).nouns for d in documents}
    texts = {d: list(docs) for d, docs in train.items()}
    if kind != "documents":
        for d, reqs in synthesise(train, nouns, SYNTH_REQUESTS, seed).items():
            texts[d] += marked(reqs, documents, known)
    router = Router(kind, DomainClassifier().fit(texts, max_per_domain=None, seed=seed),
                    vocabulary=Vocabulary.fit({d: train[d] + docs[ROUTER_DOCS:] for d, docs in documents.items()})
                    if kind == "vocabulary" else None)
    router.threshold = calibrate(router, synthesise(held, nouns, 100, seed + 1))
    router.train_seconds = time.perf_counter() - start
    return router


class LikelihoodRouter:
    """Routes by the served model's own likelihood of the topic as each domain's prompt."""
    kind = "likelihood"

    def __init__(self, served, threshold: float = 0.0):
        self.served, self.threshold = served, threshold

    @property
    def known(self) -> dict:
        return self.served.known_domains

    @property
    def domains(self) -> list[str]:
        return list(self.served.domains)

    def bpb(self, request: str) -> dict[str, float]:
        import torch
        from ..data.tokenizer import request_prefix
        from ..inference.generate import request_ids
        topic = split_request(request, [self.served.domain(d) for d in self.domains]).topic
        out = {}
        for d in self.domains:
            domain, tokenizer = self.served.domain(d), self.served.tokenizer_for(d)
            prompt = domain.prompt(topic) or topic or request
            ids, given = request_ids(tokenizer, domain, prompt), len(request_prefix(tokenizer, domain))
            model = self.served.for_domain(d)
            device = next(model.parameters()).device
            with torch.no_grad():  # the prompt's tokens, each given what precedes it
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, given - 1:-1].float()
            nats = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[given:], device=device), reduction="sum")
            out[d] = float(nats) / math.log(2) / max(1, len(prompt.encode()))
        return out

    def scores(self, requests: list[str]) -> list[dict[str, float]]:
        return [_softmax({d: -b for d, b in self.bpb(r).items()}) for r in requests]


class CombinedRouter:
    """The product of two routers' probabilities, renormalised."""
    kind = "combined"

    def __init__(self, *routers, threshold: float = 0.0):
        self.routers, self.threshold = routers, threshold

    @property
    def known(self) -> dict:
        return self.routers[0].known

    @property
    def domains(self) -> list[str]:
        return self.routers[0].domains

    def knows(self, request: str) -> bool:
        return self.routers[0].knows(request)

    def scores(self, requests: list[str]) -> list[dict[str, float]]:
        return [_product(per) for per in zip(*(r.scores(requests) for r in self.routers))]


def _product(distributions) -> dict[str, float]:
    """The renormalised product of probability distributions over the same domains."""
    return _softmax({d: sum(math.log(max(p[d], 1e-12)) for p in distributions) for d in distributions[0]})


def _softmax(logits: dict[str, float]) -> dict[str, float]:
    top = max(logits.values())
    e = {d: math.exp(v - top) for d, v in logits.items()}
    return {d: v / sum(e.values()) for d, v in e.items()}


# -- routing -------------------------------------------------------------------------------------------

@dataclass
class Route:
    domain: str
    confidence: float          # the router's probability of `domain`
    prompt: str                # generation prompt after `<|bos|><|domain|>`
    scores: dict[str, float] = field(default_factory=dict)  # the router's probabilities
    reason: str = ""
    fits: bool = True          # False: no domain fits the request; `domain` is only the best guess


def route(request: str, router) -> Route:
    """Pick the domain for a free-text request with `router` and build its generation prompt."""
    check_length(request)
    if not request.strip():
        raise UserError("empty request; say what to write, e.g. 'a recipe for banana bread'")
    scores = router.scores([request])[0]
    known = router.known
    domains = [get_domain(d, known) for d in scores]
    domain = max(scores, key=scores.get)
    confidence = scores[domain]
    parsed = split_request(request, domains)
    reason = f"{router.kind} router: {domain} {confidence:.2f}"
    if parsed.genre:
        reason += f"; the request names a {parsed.genre} genre noun"
    fits = confidence >= router.threshold
    if not fits:
        reason = (f"no domain fits this request ({router.kind} router's best guess {domain} {confidence:.2f} "
                  f"is below its threshold {router.threshold:.2f})")
    elif hasattr(router, "knows") and not router.knows(request):
        fits, reason = False, (f"no domain fits this request (none of its words occurs in the domains' training "
                               f"text; best guess {domain} {confidence:.2f})")
    return Route(domain, confidence, get_domain(domain, known).prompt(parsed.topic), scores, reason, fits)


def router_from_data(domain_data: dict[str, DomainSource], kind: str = DEFAULT_ROUTER, known=None) -> Router:
    """A classifier router over the domains of `domain_data` (a run record's `domain_data`: each domain's
    training file), from their real training text. Cached in the expandlm cache directory, keyed by a
    hash of what it is trained from, so a model folder is only ever read (never written: serving
    and generating from a folder leave it as it was)."""
    from ..data.corpus import load_corpus
    from ..data.shards import default_cache_dir

    texts = {d: load_corpus(entry.train, get_domain(d, known), limit=VOCABULARY_DOCS).documents
             for d, entry in sorted(domain_data.items())}
    path = default_cache_dir() / "routers" / f"{kind}-{router_key(texts, kind, known)}.joblib"
    try:
        router = Router.load(path) if path.exists() else None
    except UserError:  # a damaged cache entry is trained again
        router = None
    if router is None:
        router = train_router(texts, kind, known=known)
        if is_main_process():
            router.save(path)
    router.known = dict(known or {})
    return router


def router_key(texts: dict[str, list[str]], kind: str, known=None) -> str:
    """What a trained router depends on: its format and kind, the domains' genre nouns and documents."""
    digest = hashlib.sha256(f"{FORMAT}|{kind}|{ROUTER_DOCS}".encode())
    for d, docs in sorted(texts.items()):
        digest.update(f"|{d}|{','.join(get_domain(d, known).nouns)}|{len(docs)}|".encode())
        for doc in docs:
            digest.update(hashlib.sha256(doc.encode()).digest())
    return digest.hexdigest()[:20]


def load_router(served, kind: str = DEFAULT_ROUTER):
    """The request router of a served model, trained (on first use, then cached: `router_from_data`)
    from the real training text of the domains the model serves (its run record names the files),
    so it exists for every model whatever its strategy; the likelihood router needs nothing but
    the model. None for a single-domain model."""
    if kind not in ROUTERS:
        raise UserError(f"unknown router '{kind}' (known: {', '.join(ROUTERS)})")
    domains = served.domains
    if len(domains) < 2:
        return None
    if kind == "likelihood":
        return LikelihoodRouter(served)
    data = served.domain_data()
    missing = [d for d in domains if d not in data]
    if missing:
        raise UserError(f"{served.folder / RUN_RECORD}: field 'domain_data' lacks {', '.join(missing)}; "
                        "cannot train a request router")
    router = router_from_data({d: data[d] for d in domains}, DEFAULT_ROUTER if kind == "combined" else kind,
                              served.known_domains)
    return CombinedRouter(router, LikelihoodRouter(served), threshold=router.threshold) if kind == "combined" else router


def route_request(request: str, served, kind: str = DEFAULT_ROUTER) -> Route:
    """Route for a served model: its router, or its single domain."""
    router = load_router(served, kind)
    if router is None:
        if not served.domains:
            raise UserError(f"{served.path}: no expandlm.json saying which domains it serves; use --domain")
        domain = served.domain(served.domains[0])
        topic = split_request(request, [domain]).topic
        return Route(domain.name, 1.0, domain.prompt(topic), {domain.name: 1.0}, "the model serves one domain")
    return route(request, router)
