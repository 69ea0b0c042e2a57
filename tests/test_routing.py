import pytest

from expandlm.corpus import load_corpus
from expandlm.domains import get_domain
from expandlm.errors import UserError
from expandlm.domains.recipes import recipe_prompt
from expandlm.domains.stories import story_prompt
from expandlm.routing import route, split_request
from expandlm.suite import DomainClassifier


class Fixed:
    """A stand-in classifier that gives every text the same probabilities."""
    def __init__(self, **scores):
        self.scores = scores

    def predict_proba(self, texts):
        return [dict(self.scores) for _ in texts]


@pytest.fixture(scope="module")
def classifier(shared_data):
    docs = {name: load_corpus(shared_data / get_domain(name).train_file, get_domain(name), limit=500).documents
            for name in ("stories", "recipes")}
    return DomainClassifier().fit(docs)


@pytest.mark.parametrize("request_, domain, prompt", [
    ("write a recipe for banana bread", "recipes", "Banana Bread"),
    ("Could you please give me a recipe for chicken noodle soup?", "recipes", "Chicken Noodle Soup"),
    ("How do I bake chocolate chip cookies?", "recipes", "Chocolate Chip Cookies"),
    ("how to make guacamole please", "recipes", "Guacamole"),
    ("bake me a chocolate cake", "recipes", "Chocolate Cake"),
    ("Write a banana bread recipe.", "recipes", "Banana Bread"),
    ("give me a quick recipe for mom's lasagna with spinach", "recipes", "Mom's Lasagna with Spinach"),
    ("give me a recipe", "recipes", ""),
    ("tell me a story about a brave little cat", "stories", "Once upon a time, there was a brave little cat."),
    ("Tell me a bedtime story about an old owl!", "stories", "Once upon a time, there was an old owl."),
    ("I'd like a tale about a little girl named Lily who lost her red ball", "stories",
     "Once upon a time, there was a little girl named Lily who lost her red ball."),
    ("tell me a story about a baker who bakes bread", "stories", "Once upon a time, there was a baker who bakes bread."),
    ("Once upon a time there was a dragon who loved to sing", "stories",
     "Once upon a time, there was a dragon who loved to sing."),
    ("write a short story", "stories", ""),
])
def test_realistic_requests(classifier, request_, domain, prompt):
    r = route(request_, classifier)
    assert (r.domain, r.prompt) == (domain, prompt)
    assert set(r.scores) == {"stories", "recipes"} and sum(r.scores.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("request_, domain, prompt", [
    ("pancakes with blueberry syrup", "recipes", "Pancakes with Blueberry Syrup"),
    ("a little boy who wanted to fly", "stories", "Once upon a time, there was a little boy who wanted to fly."),
])
def test_the_classifier_decides_without_keywords(classifier, request_, domain, prompt):
    r = route(request_, classifier)
    assert (r.domain, r.prompt, r.reason) == (domain, prompt, "classifier")
    assert r.confidence == r.scores[domain] > 0.5


def test_instruction_overrides_the_classifier_and_says_so():
    r = route("Tell me a story about a cake", Fixed(recipes=0.9, stories=0.1))
    assert (r.domain, r.confidence) == ("stories", 1.0)
    assert r.reason == "instruction 'story about' (classifier alone: recipes 0.90)"
    assert r.scores == {"recipes": 0.9, "stories": 0.1}  # the classifier's view is still reported


def test_lone_keyword_decides_but_two_genres_leave_it_to_the_classifier():
    r = route("bake me something nice", Fixed(recipes=0.2, stories=0.8))
    assert (r.domain, r.confidence, r.reason) == ("recipes", 1.0, "keyword 'bake' (classifier alone: stories 0.80)")
    r = route("cooking tales", Fixed(recipes=0.3, stories=0.7))
    assert (r.domain, r.confidence, r.reason) == ("stories", 0.7, "classifier")


def test_other_domains_get_the_topic_as_is_and_genres_of_unserved_domains_are_ignored(monkeypatch):
    from expandlm.domains import DOMAINS, Domain
    monkeypatch.setitem(DOMAINS, "poems", Domain("poems"))  # a domain with no request words of its own
    r = route("write a poem about the sea", Fixed(poems=0.8, stories=0.2))
    assert (r.domain, r.prompt, r.reason) == ("poems", "a poem about the sea", "classifier")
    r = route("a recipe for soup", Fixed(poems=0.6, stories=0.4))  # the model serves no recipes
    assert (r.domain, r.prompt, r.reason) == ("poems", "a recipe for soup", "classifier")


def test_split_request():
    assert split_request("Could you tell me a story about a brave cat?").topic == "a brave cat"
    parsed = split_request("Please write me a recipe for apple pie, please!")
    assert (parsed.genre, parsed.instruction, parsed.topic) == ("recipes", "recipe for ", "apple pie")
    parsed = split_request("make me some pancakes")
    assert (parsed.genre, parsed.instruction, parsed.topic) == (None, "make me ", "some pancakes")
    assert split_request("a little boy who wanted to fly").instruction == ""


def test_prompt_builders():
    assert recipe_prompt("a chicken with rice and beans") == "Chicken with Rice and Beans"
    assert recipe_prompt("some BBQ ribs") == "BBQ Ribs"
    assert recipe_prompt("") == ""
    assert story_prompt("there was a cat") == "Once upon a time, there was a cat."
    assert story_prompt("Once upon a time, there lived a king") == "Once upon a time, there was a king."
    assert story_prompt("") == ""


def test_empty_request():
    with pytest.raises(UserError, match="empty request"):
        route("   ", Fixed(recipes=0.5, stories=0.5))
