import gzip
import json
import textwrap

import pytest

from expandlm.domains import DOMAINS, Domain, folder_domains, get_domain, save_specs
from expandlm.domains.checks import python_parses, recipe_layout
from expandlm.errors import UserError

recipes = get_domain("recipes")


def write_spec(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_recipe_renders_design_layout():
    text = recipes.render({"title": " Pancakes ", "ingredients": ["1 egg", " ", "2 cups milk"],
                           "directions": ["Whisk.", "Fry."]}, "x")
    assert text == "Pancakes\n\nIngredients:\n- 1 egg\n- 2 cups milk\n\nDirections:\n1. Whisk.\n2. Fry."
    assert recipe_layout(text)


def test_prerendered_recipe_text_is_taken_as_is():
    assert recipes.render({"input": "Soup\n\nIngredients:\n- water"}, "x") == "Soup\n\nIngredients:\n- water"


@pytest.mark.parametrize("record, message", [
    ({"title": "T", "ingredients": ["a"]}, "missing field 'directions'"),
    ({"title": 3, "ingredients": ["a"], "directions": ["b"]}, "field 'title' must be str, got int"),
    ({"title": "T", "ingredients": "a", "directions": ["b"]}, "field 'ingredients' must be list"),
    ({"title": "T", "ingredients": ["a", 2], "directions": ["b"]}, "field 'ingredients[1]' must be str"),
    ({"title": "T", "ingredients": [" "], "directions": ["b"]}, "'ingredients' has no non-empty item"),
    ({"title": " ", "ingredients": ["a"], "directions": ["b"]}, "field 'title' is empty"),
])
def test_bad_recipe_fields_are_named(record, message):
    with pytest.raises(UserError, match=r"^f.jsonl:7: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        recipes.render(record, "f.jsonl:7")


def test_story_needs_text():
    with pytest.raises(UserError, match="missing field 'text'"):
        get_domain("stories").render({"story": "x"}, "f:1")


def test_registry_and_tags():
    assert get_domain("stories").tag == "<|stories|>"
    assert recipes.hub_id == "corbt/all-recipes"
    assert list(DOMAINS)[:3] == ["stories", "recipes", "code"]
    with pytest.raises(UserError, match="unknown domain 'poems' \\(known: .*recipes.*stories.*poems.yaml"):
        get_domain("poems")


def test_request_prompts_of_the_built_in_domains():
    stories, code = get_domain("stories"), get_domain("code")
    assert stories.prompt("a brave cat") == "Once upon a time, there was a brave cat."
    assert stories.prompt("Once upon a time there lived a king") == "Once upon a time, there was a king."
    assert stories.prompt("") == ""
    assert recipes.prompt("a banana bread with nuts") == "Banana Bread with Nuts"
    assert code.prompt("flattens a nested list") == "def flatten_nested_list("
    assert code.prompt("  def merge(a, b):") == "def merge(a, b):"   # a signature is the prompt as it is
    assert code.prompt("@property") == "@property"


def test_code_is_valid_when_it_parses(shared_data):
    code = get_domain("code")
    assert code.valid("def f(x):\n    return x + 1", finished=True)
    assert not code.valid("def f(x):\n    return x + 1", finished=False)  # it ran past the length limit
    assert not code.valid("def f(x:\n    return", finished=True)
    assert not python_parses("x = '\0'\x00")
    # every real validation function parses: the check fits the corpus
    rows = [json.loads(line) for line in gzip.open(shared_data / "code.valid.jsonl.gz")]
    assert len(rows) == 218 and all(code.check(r["text"]) for r in rows)


def test_a_users_domain_declared_in_yaml(tmp_path, user_domains):
    (tmp_path / "poems.jsonl").write_text(json.dumps({"title": "Rain", "lines": ["soft rain", "on the roof"]}) + "\n")
    spec = write_spec(tmp_path / "poems.yaml", """\
        name: poems
        description: short poems
        data: {train: poems.jsonl}
        text:
          template: "{title}\\n\\n{lines:lines}"
          fields: {title: str, lines: list}
        check: {pattern: '[^\\n]+\\n\\n(?:[^\\n]+\\n?)+'}
        request: {nouns: [poem], prompt: "{topic:title}"}
        """)
    poems = get_domain(str(spec))
    assert get_domain("poems") is poems and poems.tag == "<|poems|>"
    train, valid = poems.local_files(None)
    assert train == str(tmp_path / "poems.jsonl") and valid is None   # relative to the spec file
    text = poems.render({"title": "Rain", "lines": ["soft rain", "on the roof"]}, "p:1")
    assert text == "Rain\n\nsoft rain\non the roof"
    assert poems.valid(text, True) and not poems.valid("one line only", True)
    assert poems.prompt("the quiet sea") == "The Quiet Sea"
    with pytest.raises(UserError, match="^p:2: missing field 'lines' \\(expected list\\)"):
        poems.render({"title": "x"}, "p:2")


@pytest.mark.parametrize("body, message", [
    ("name: poems\ntext: {field: text}\ncolour: red\n", "unknown key 'colour'"),
    ("text: {field: text}\n", "'name' is required"),
    ("name: Poems!\n", "'name': expected lower-case letters"),
    ("name: poems\ntext: {field: text, template: '{a}'}\n", "exactly one of 'field' or 'template'"),
    ("name: poems\ntext: {template: '{title} {body}', fields: {title: str}}\n", "uses \\['body'\\], not declared"),
    ("name: poems\ntext: {template: '{t}', fields: {t: int}}\n", "'text.fields.t': input should be 'str' or 'list'"),
    ("name: poems\ncheck: rhymes\n", "unknown check 'rhymes' \\(known: recipe_layout, python_parses"),
    ("name: poems\ncheck: {pattern: '(unclosed'}\n", "'check.pattern': not a valid regex"),
    ("name: poems\nrequest: {nouns: poem}\n", "'request.nouns': input should be a valid list"),
    ("name: [oops\n", ":2: invalid YAML"),
])
def test_a_bad_spec_names_the_file_and_key(tmp_path, user_domains, body, message):
    spec = tmp_path / "poems.yaml"
    spec.write_text(body)
    with pytest.raises(UserError, match=f"{spec.name}.*{message}"):
        get_domain(str(spec))
    assert "poems" not in DOMAINS


@pytest.mark.parametrize("key, pattern", [("request.verbatim", "(a)\\1"), ("request.strip", "(?=a)"),
                                          ("check.pattern", "(?<!x)y")])
def test_a_pattern_without_a_linear_time_bound_is_refused_in_one_line(tmp_path, user_domains, key, pattern):
    """Backreferences and lookaround: RE2 cannot run them in linear time, so the spec is refused."""
    section, name = key.split(".")
    spec = write_spec(tmp_path / "poems.yaml", f"name: poems\n{section}: {{{name}: '{pattern}'}}\n")
    with pytest.raises(UserError) as info:
        get_domain(str(spec))
    assert str(info.value).startswith(f"{spec}: '{key}': not a valid regex for RE2") and "\n" not in str(info.value)


def test_a_users_pattern_runs_in_linear_time(tmp_path, user_domains):
    from conftest import finishes

    poems = get_domain(str(write_spec(tmp_path / "poems.yaml", """\
        name: poems
        check: {pattern: '(a+)+$'}
        request: {verbatim: '(a+)+$', strip: '(b+)+$'}
        """)))
    assert poems.prompt("a" * 27 + "c") == "a" * 27 + "c"
    assert poems.prompt("b" * 27 + "c") == "b" * 27 + "c"
    assert not poems.check("a" * 27 + "c")
    # backtracking takes 2^n steps: at n = 60, longer than anyone waits; RE2 is linear
    assert finishes(f"from expandlm.domains import get_domain\npoems = get_domain({str(tmp_path / 'poems.yaml')!r})\n"
                    "assert poems.prompt('a' * 60 + 'c') == 'a' * 60 + 'c'\nassert not poems.check('a' * 60 + 'c')")
    assert poems.prompt("aaa") == "aaa" and poems.prompt("x bbb") == "x" and poems.check("aaa")


def test_one_name_one_spec(tmp_path, user_domains):
    with pytest.raises(UserError, match="domain 'stories' is built in"):
        get_domain(str(write_spec(tmp_path / "s.yaml", "name: stories\ndescription: mine\n")))
    get_domain(str(write_spec(tmp_path / "a.yaml", "name: poems\n")))
    get_domain(str(write_spec(tmp_path / "same.yaml", "name: poems\n")))  # the same spec again is fine
    with pytest.raises(UserError, match="two different specs declare domain 'poems'"):
        get_domain(str(write_spec(tmp_path / "b.yaml", "name: poems\ndescription: other\n")))


def test_a_model_folder_keeps_its_users_domains(tmp_path, user_domains):
    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "poems.jsonl").write_text('{"text": "x"}\n')
    get_domain(str(write_spec(tmp_path / "spec" / "poems.yaml", "name: poems\ndata: {train: poems.jsonl}\n")))
    folder = tmp_path / "model"
    folder.mkdir()
    save_specs(folder, [get_domain("stories"), get_domain("poems")])
    saved = (folder / "domains.yaml").read_text()
    assert "stories" not in saved and str(tmp_path / "spec" / "poems.jsonl") in saved  # data path made absolute
    del DOMAINS["poems"]
    declared = folder_domains(folder)
    assert "poems" not in DOMAINS  # reading a folder registers nothing
    assert get_domain("poems", declared).local_files(None)[0] == str(tmp_path / "spec" / "poems.jsonl")
    assert isinstance(declared["poems"], Domain)
    with pytest.raises(UserError, match="unknown domain 'poems'"):
        get_domain("poems")


def test_two_folders_may_each_declare_their_own_domain_of_one_name(tmp_path, user_domains):
    from expandlm.domains import DomainSpec
    for i, description in enumerate(("short poems", "long poems")):
        (tmp_path / str(i)).mkdir()
        save_specs(tmp_path / str(i), [Domain(DomainSpec(name="poems", description=description))])
    first, second = folder_domains(tmp_path / "0"), folder_domains(tmp_path / "1")
    assert first["poems"].spec.description == "short poems" and second["poems"].spec.description == "long poems"
