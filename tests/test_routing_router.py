"""Routing learned from data: three made-up domains (registered here, not the built-ins) whose routers
must route by content alone, by genre noun across domains, and flag what fits none of them."""
import json
import random
from pathlib import Path

import pytest

from expandlm.domains import DOMAINS, Domain, DomainSpec, RequestSpec, get_domain
from expandlm.errors import UserError
from expandlm.records import DomainSource
from expandlm.routing.router import Router, route, split_request, synthesise, train_router

REQUESTS = Path(__file__).parent / "data" / "requests.jsonl"
# Plain how-to questions and invitations to imagine, without a genre noun, written before the router
# read content words against each domain's vocabulary (issue 20); never used to tune it.
PLAIN_REQUESTS = Path(__file__).parent / "data" / "requests_plain.jsonl"

# Three vocabularies that share no word: the router can only know them from the documents.
WORDS = {
    "sails": "ship harbour anchor mast sailor wave deck rope captain storm tide compass".split(),
    "gardens": "tulip soil seed compost rake bloom hedge orchard petal weed spade sprout".split(),
    "stars": "comet orbit nebula telescope galaxy planet crater meteor rocket moon eclipse quasar".split(),
}
NOUNS = {"sails": ("log", "voyage"), "gardens": ("plan",), "stars": ("chart", "atlas")}


@pytest.fixture
def made_up(monkeypatch):
    for name, nouns in NOUNS.items():
        spec = DomainSpec(name=name, request=RequestSpec(nouns=list(nouns), prompt=f"[{name}] {{topic}}"))
        monkeypatch.setitem(DOMAINS, name, Domain(spec))
    rng = random.Random(0)
    return {name: [" ".join(rng.choice(words) for _ in range(30)) for _ in range(60)]
            for name, words in WORDS.items()}


@pytest.fixture
def router(made_up):
    return train_router(made_up, "requests")


def test_content_alone_decides_without_a_noun(router):
    for name, words in WORDS.items():
        r = route(f"{words[0]} and {words[1]} with a {words[2]}", router)
        assert (r.domain, r.fits) == (name, True), r
        assert r.confidence == r.scores[name] == max(r.scores.values())
        assert r.prompt == f"[{name}] {words[0]} and {words[1]} with a {words[2]}"


def test_the_first_genre_noun_decides_across_domains(router):
    r = route("write a voyage about a tulip and a compost heap", router)
    assert (r.domain, r.prompt) == ("sails", "[sails] a tulip and a compost heap")
    assert "names a sails genre noun" in r.reason
    assert route("a plan for a comet orbit", router).domain == "gardens"
    assert route("an atlas that tells a voyage about ship decks", router).domain == "stars"  # first noun wins


def test_a_request_that_fits_no_domain_is_flagged_with_its_best_guess(router):
    r = route("asdf qwerty", router)
    assert not r.fits and r.domain in NOUNS and "no domain fits" in r.reason
    assert sum(r.scores.values()) == pytest.approx(1.0)


def test_the_threshold_comes_from_held_out_requests(made_up):
    r = train_router(made_up, "requests")
    assert 1 / 3 < r.threshold < 1.0  # above chance for three domains, reached by most in-domain requests
    held = synthesise(made_up, NOUNS, 60, seed=5)
    tops = [max(s.values()) for reqs in held.values() for s in r.scores(reqs)]
    assert sum(t >= r.threshold for t in tops) / len(tops) > 0.9


def test_documents_router_is_selectable_and_keywords_are_never_used(made_up):
    r = train_router(made_up, "documents")
    assert r.kind == "documents" and sorted(r.domains) == sorted(WORDS)
    with pytest.raises(UserError, match="router 'likelihood' is not trained"):
        train_router(made_up, "likelihood")


def test_saved_router_reloads_with_the_same_scores(router, tmp_path):
    path = router.save(tmp_path / "router.joblib")
    again = Router.load(path)
    request = ["a voyage about tulips", "comet crater"]
    assert (again.kind, again.threshold) == (router.kind, router.threshold)
    assert again.scores(request) == router.scores(request)
    (tmp_path / "old.joblib").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="not a readable router file"):
        Router.load(tmp_path / "old.joblib")


def test_training_is_deterministic(made_up):
    a, b = train_router(made_up, "requests", seed=3), train_router(made_up, "requests", seed=3)
    assert a.scores(["a rope and a seed"]) == b.scores(["a rope and a seed"]) and a.threshold == b.threshold


def test_a_models_router_covers_exactly_its_domains(two_domain_models):
    from expandlm.routing.router import load_router
    from expandlm.formats.served import load_served
    served = load_served(two_domain_models["expand_branch"], device="cpu")
    router = load_router(served)
    assert sorted(router.domains) == sorted(served.domains) == ["recipes", "stories"]
    assert load_router(served, "likelihood").domains == served.domains
    r = route("give me a recipe for banana bread", load_router(served, "combined"))
    assert set(r.scores) == {"recipes", "stories"} and r.domain == "recipes"
    with pytest.raises(UserError, match="unknown router 'regex'"):
        load_router(served, "regex")


def test_split_request():
    assert split_request("Could you tell me a story about a brave cat?").topic == "a brave cat"
    parsed = split_request("Please write me a recipe for apple pie, please!")
    assert (parsed.genre, parsed.instruction, parsed.topic) == ("recipes", "Please write me a recipe for ", "apple pie")
    assert split_request("Write a banana bread recipe.").topic == "banana bread"
    assert split_request("write a short story").topic == ""
    assert split_request("a function that flattens a nested list").topic == "flattens a nested list"
    assert split_request("How do I make guacamole?").topic == "guacamole"
    parsed = split_request("a little boy who wanted to fly")
    assert (parsed.genre, parsed.instruction, parsed.topic) == (None, "", "a little boy who wanted to fly")
    assert split_request("def merge_sorted(a, b):").topic == "def merge_sorted(a, b):"


def test_reading_a_request_takes_time_linear_in_its_length():
    """The trailer regex it replaces took the square of a run of spaces' length (72 KB: 68 s; 4 MB: hours)."""
    import re

    from conftest import finishes
    from expandlm.routing.router import MAX_REQUEST_CHARS, strip_trailer

    assert split_request("a" + " " * 16_000 + "b please!").topic == "a" + " " * 16_000 + "b"
    assert finishes("from expandlm.routing.router import strip_trailer\n"
                    "assert strip_trailer('a' + ' ' * 4_000_000 + 'b please!') == 'a' + ' ' * 4_000_000 + 'b'")
    with pytest.raises(UserError, match=f"the request is {MAX_REQUEST_CHARS + 1} characters; the limit is"):
        split_request("x" * (MAX_REQUEST_CHARS + 1))
    old = re.compile(r"(?:[\s,]*\bplease)?[\s.!?,;]*$", re.IGNORECASE)  # what it does, on short texts
    for text in ("a pie, please!", "please", "PLEASE.", "apple please", "applePLEASE", "x please, please",
                 "def f(x):", "a ;, . ! ?", "é please", "a_please", "tea , please ?!", "", "  ,please"):
        assert strip_trailer(text) == old.sub("", text), text


def test_prompt_builders():
    assert get_domain("recipes").prompt("a chicken with rice and beans") == "Chicken with Rice and Beans"
    assert get_domain("recipes").prompt("") == ""
    assert get_domain("stories").prompt("there was a cat") == "Once upon a time, there was a cat."
    assert get_domain("stories").prompt("") == ""


def test_empty_request(router):
    with pytest.raises(UserError, match="empty request"):
        route("   ", router)


def test_the_hand_written_requests_are_data():
    rows = [json.loads(line) for line in REQUESTS.read_text().splitlines()]
    counts = {d: sum(r["domain"] == d for r in rows) for d in ("stories", "recipes", "code", None)}
    assert min(counts[d] for d in ("stories", "recipes", "code")) >= 25 and counts[None] >= 10
    assert all(set(r) == {"request", "domain"} for r in rows)


def test_the_plain_requests_are_data_and_name_no_genre():
    rows = [json.loads(line) for line in PLAIN_REQUESTS.read_text().splitlines()]
    assert len(rows) >= 60 and all(set(r) == {"request", "domain"} for r in rows)
    assert min(sum(r["domain"] == d for r in rows) for d in ("stories", "recipes", "code")) >= 20
    assert not [r for r in rows if split_request(r["request"]).genre]


def test_accuracy_on_the_hand_written_requests(shared_data):
    """A floor clearly below the measured 95% of in-domain requests routed to their domain (see
    benchmarks/results/routing_accuracy.md); it fails when routing breaks, not when it wobbles."""
    from expandlm.data.corpus import load_corpus
    from expandlm.domains import get_domain
    rows = [json.loads(line) for line in REQUESTS.read_text().splitlines()]
    names = ("stories", "recipes", "code")
    docs = {d: load_corpus(get_domain(d).data_file("train", shared_data), get_domain(d), limit=400).documents for d in names}
    router = train_router(docs, "requests")
    rows = [r for r in rows if r["domain"]]
    right = sum(route(r["request"], router).domain == r["domain"] for r in rows)
    assert right / len(rows) >= 0.85


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_routing_for_a_model_never_writes_into_its_folder(two_domain_models, tmp_path, monkeypatch):
    """Serving and generating only read a model folder: the router they train is cached elsewhere
    (under $EXPANDLM_CACHE) and a second load reuses it instead of training again."""
    import expandlm.routing.router as routing
    from expandlm.formats.served import load_served
    folder = two_domain_models["lora"]
    before = _files(folder)
    served = load_served(folder, device="cpu")
    routed = routing.route_request("give me a recipe for banana bread", served)
    assert routed.domain == "recipes"
    assert _files(folder) == before
    assert len(list((tmp_path / "cache" / "routers").glob("*.joblib"))) == 1
    monkeypatch.setattr(routing, "train_router", lambda *a, **k: pytest.fail("the cached router was trained again"))
    assert routing.route_request("give me a recipe for banana bread", served).scores == routed.scores


def test_accuracy_on_the_plain_requests(shared_data):
    """Plain how-to questions and invitations to imagine, with no genre noun, go by their content
    words: a floor clearly below the measured 100% of them routed to their domain and fitting it
    (69.7% before the vocabulary router; see benchmarks/results/routing_accuracy.md)."""
    from expandlm.routing.router import router_from_data
    rows = [json.loads(line) for line in PLAIN_REQUESTS.read_text().splitlines()]
    router = router_from_data({d: DomainSource(get_domain(d).data_file("train", shared_data))
                               for d in ("stories", "recipes", "code")})
    routes = [route(r["request"], router) for r in rows]
    assert sum(x.domain == r["domain"] and x.fits for x, r in zip(routes, rows)) / len(rows) >= 0.9
