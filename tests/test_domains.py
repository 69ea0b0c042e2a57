import pytest

from expandlm.domains import DOMAINS, get_domain
from expandlm.domains.recipes import render_recipe
from expandlm.errors import UserError


def test_recipe_renders_design_layout():
    text = render_recipe({"title": " Pancakes ", "ingredients": ["1 egg", " ", "2 cups milk"],
                          "directions": ["Whisk.", "Fry."]}, "x")
    assert text == "Pancakes\n\nIngredients:\n- 1 egg\n- 2 cups milk\n\nDirections:\n1. Whisk.\n2. Fry."


def test_prerendered_recipe_text_is_taken_as_is():
    assert render_recipe({"input": "Soup\n\nIngredients:\n- water"}, "x") == "Soup\n\nIngredients:\n- water"


@pytest.mark.parametrize("record, message", [
    ({"title": "T", "ingredients": ["a"]}, "missing field 'directions'"),
    ({"title": 3, "ingredients": ["a"], "directions": ["b"]}, "field 'title' must be str, got int"),
    ({"title": "T", "ingredients": "a", "directions": ["b"]}, "field 'ingredients' must be list"),
    ({"title": "T", "ingredients": ["a", 2], "directions": ["b"]}, "field 'ingredients[1]' must be str"),
    ({"title": "T", "ingredients": [" "], "directions": ["b"]}, "'ingredients' has no non-empty item"),
])
def test_bad_recipe_fields_are_named(record, message):
    with pytest.raises(UserError, match=r"^f.jsonl:7: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        render_recipe(record, "f.jsonl:7")


def test_story_needs_text():
    with pytest.raises(UserError, match="missing field 'text'"):
        get_domain("stories").render({"story": "x"}, "f:1")


def test_registry_and_tags():
    assert get_domain("stories").tag == "<|stories|>"
    assert get_domain("recipes").hub_id == "corbt/all-recipes"
    assert {"stories", "recipes"} <= set(DOMAINS)
    with pytest.raises(UserError, match="unknown domain 'poems' \\(known: .*recipes.*stories"):
        get_domain("poems")
