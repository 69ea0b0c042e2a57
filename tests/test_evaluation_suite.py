import os

import joblib
import pytest

from expandlm.data.corpus import load_corpus
from expandlm.domains import get_domain
from expandlm.errors import UserError
from expandlm.evaluation.suite import domain_control_accuracy, text_health, words
from expandlm.routing.classifier import DomainClassifier

recipe_validity = get_domain("recipes").valid  # the recipes domain's structural check

RECIPE = """Banana Bread

Ingredients:
- 3 ripe bananas
- 2 cups flour
- 1 cup sugar

Directions:
1. Mash the bananas.
2. Mix everything.
3. Bake at 350F for 1 hour."""


def test_valid_recipe_in_the_rendered_layout():
    assert recipe_validity(RECIPE, True)
    record = {"title": "Soup", "ingredients": ["water", "salt"], "directions": ["Boil."]}
    assert recipe_validity(get_domain("recipes").render(record, "test"), True)


def test_trailing_whitespace_is_tolerated():
    assert recipe_validity(RECIPE.replace("\n", "  \n") + " \n\n", True)
    assert recipe_validity(RECIPE.replace("\n\n", "\n"), True)  # no blank separator lines


@pytest.mark.parametrize("broken", [
    RECIPE.replace("Banana Bread\n", "\n"),                         # no title
    RECIPE.replace("Banana Bread\n\n", ""),                         # title missing entirely
    RECIPE.replace("Ingredients:\n", ""),                           # no Ingredients header
    RECIPE.replace("Directions:\n", ""),                            # no Directions header
    RECIPE.replace("- 2 cups flour\n- 1 cup sugar\n", ""),          # one ingredient only
    RECIPE.replace("- 3 ripe bananas\n- 2 cups flour\n- 1 cup sugar\n", ""),  # no ingredients
    RECIPE.split("\n1.")[0],                                        # no steps
    RECIPE.replace("1. ", "").replace("2. ", "").replace("3. ", ""),  # unnumbered steps
    RECIPE.replace("2. Mix", "3. Mix"),                             # numbering skips
    RECIPE + "\nEnjoy!",                                            # stray line after the steps
    RECIPE.replace("- 2 cups", "2 cups"),                           # not a `- ` line
    "Directions:\n1. Mix.\n\nIngredients:\n- a\n- b",              # sections reversed
    "",
])
def test_invalid_recipes(broken):
    assert not recipe_validity(broken, True)


def test_unfinished_recipe_is_invalid():
    assert not recipe_validity(RECIPE, False)


def test_real_recipes_fail_only_for_a_single_ingredient(shared_data):
    docs = load_corpus(shared_data / "recipes.valid.jsonl.gz", get_domain("recipes")).documents
    failed = [d for d in docs if not recipe_validity(d, True)]
    assert len(failed) / len(docs) <= 0.05
    assert all(d.split("Directions:")[0].count("\n- ") == 1 for d in failed)


def test_words_tokenisation():
    assert words("Don't stop, Lily's CAT!  Run-away 42.") == ["don't", "stop", "lily's", "cat", "run", "away", "42"]
    assert words("The cat. The cat, the cat!") == words("the cat the cat the cat")


def test_text_health_known_numbers():
    h = text_health([("The cat sat on the mat.", True), ("The cat, the cat, the cat!", False)])
    # bigrams: 5 + 5, distinct {the cat, cat sat, sat on, on the, the mat, cat the} = 6
    # 4-grams: 3 + 3; the second sample's third 4-gram repeats its first
    assert h == {"finished_share": 0.5, "distinct_2": 0.6, "repeated_4gram_rate": pytest.approx(1 / 6), "samples": 2}


def test_text_health_repeats_do_not_span_samples():
    h = text_health([("a b c d", True), ("a b c d", True)])
    assert h["repeated_4gram_rate"] == 0.0 and h["distinct_2"] == 0.5 and h["finished_share"] == 1.0


def test_text_health_edge_cases():
    assert text_health([("Hi", True)]) == {"finished_share": 1.0, "distinct_2": 0.0,
                                            "repeated_4gram_rate": 0.0, "samples": 1}
    with pytest.raises(UserError, match="at least one sample"):
        text_health([])


# ---------------------------------------------------------------------------------------------------
# the domain classifier

TOY = {
    "stories": ["Once upon a time there was a little cat. The cat was happy.",
                "Lily had a red ball. She played with her dog and they were happy."] * 5,
    "recipes": ["Ingredients:\n- 2 cups flour\n- 1 egg\nDirections:\n1. Mix the flour and egg.",
                "Ingredients:\n- 1 onion\n- salt\nDirections:\n1. Chop the onion. 2. Fry with salt."] * 5,
}


@pytest.fixture(scope="module")
def toy():
    return DomainClassifier().fit(TOY)


@pytest.fixture(scope="module")
def real(shared_data):
    def docs(name, file, limit=None):
        return load_corpus(shared_data / file, get_domain(name), limit=limit).documents
    train = {"stories": docs("stories", "tinystories.jsonl.gz", 1000), "recipes": docs("recipes", "recipes.jsonl.gz", 1000)}
    valid = {"stories": docs("stories", "tinystories.valid.jsonl.gz"), "recipes": docs("recipes", "recipes.valid.jsonl.gz")}
    return DomainClassifier().fit(train), valid


def test_classifier_is_accurate_on_real_validation_text(real):
    clf, valid = real
    assert clf.per_domain == 1000 and clf.domains == ["recipes", "stories"]
    acc = clf.accuracy(valid)
    assert acc["stories"] >= 0.95 and acc["recipes"] >= 0.95, acc


def test_probabilities_and_predictions(toy):
    texts = ["The little dog was happy and played.", "Mix 2 cups flour with salt."]
    probs = toy.predict_proba(texts)
    assert [set(p) for p in probs] == [{"stories", "recipes"}] * 2
    assert all(sum(p.values()) == pytest.approx(1.0) for p in probs)
    assert toy.predict(texts) == ["stories", "recipes"]
    assert toy.predict_proba([]) == []


def test_domains_are_balanced_deterministically():
    unbalanced = {"stories": TOY["stories"] * 3, "recipes": TOY["recipes"]}
    a = DomainClassifier().fit(unbalanced, seed=1)
    assert a.per_domain == len(TOY["recipes"])
    assert DomainClassifier().fit(unbalanced, max_per_domain=4).per_domain == 4
    b = DomainClassifier().fit(unbalanced, seed=1)
    assert a.predict_proba(["a cat and flour"]) == b.predict_proba(["a cat and flour"])


def test_save_load_round_trip(real, tmp_path):
    clf, valid = real
    texts = valid["stories"][:20] + valid["recipes"][:20]
    path = clf.save(tmp_path / "sub" / "judge.joblib")
    assert os.listdir(tmp_path / "sub") == ["judge.joblib"]  # no temp file left behind
    loaded = DomainClassifier.load(path)
    assert loaded.domains == clf.domains and loaded.per_domain == clf.per_domain
    assert loaded.predict_proba(texts) == clf.predict_proba(texts)


def test_fit_errors():
    with pytest.raises(UserError, match="at least two domains"):
        DomainClassifier().fit({"stories": TOY["stories"]})
    with pytest.raises(UserError, match="'recipes' has no non-empty text"):
        DomainClassifier().fit({"stories": TOY["stories"], "recipes": ["", "  "]})
    with pytest.raises(UserError, match="not trained"):
        DomainClassifier().predict(["x"])


def test_load_errors_name_the_path(tmp_path, toy):
    missing = tmp_path / "nope.joblib"
    with pytest.raises(UserError, match=f"{missing}: no such classifier file"):
        DomainClassifier.load(missing)
    corrupt = tmp_path / "corrupt.joblib"
    corrupt.write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match=f"{corrupt}: not a readable classifier file"):
        DomainClassifier.load(corrupt)
    truncated = tmp_path / "truncated.joblib"
    truncated.write_bytes(toy.save(tmp_path / "ok.joblib").read_bytes()[:200])
    with pytest.raises(UserError, match="truncated.joblib: not a readable"):
        DomainClassifier.load(truncated)
    foreign = tmp_path / "foreign.joblib"
    joblib.dump({"something": "else"}, foreign)
    with pytest.raises(UserError, match="foreign.joblib: not a domain classifier file"):
        DomainClassifier.load(foreign)


def test_domain_control_accuracy(toy):
    samples = {"stories": ["The cat was happy.", "Lily played with her dog.", "Mix the flour and egg.",
                           "Once upon a time there was a dog."],
               "recipes": ["Chop the onion and fry with salt.", "- 2 cups flour\n1. Mix."]}
    assert domain_control_accuracy(toy, samples) == {"stories": 0.75, "recipes": 1.0}
    with pytest.raises(UserError, match="does not know domain 'poems'"):
        domain_control_accuracy(toy, {"poems": ["Roses are red."]})
    with pytest.raises(UserError, match="no texts for domain 'stories'"):
        domain_control_accuracy(toy, {"stories": []})
