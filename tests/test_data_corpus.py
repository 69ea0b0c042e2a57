import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from expandlm.data.corpus import is_hub_id, load_corpus, split_holdout
from expandlm.domains import get_domain
from expandlm.errors import UserError
from tests.conftest import RECIPES, STORIES

stories, recipes = get_domain("stories"), get_domain("recipes")


def test_jsonl_and_gz(stories_file, recipes_file):
    c = load_corpus(stories_file, stories)
    assert c.documents == STORIES
    r = load_corpus(recipes_file, recipes)
    assert len(r.documents) == len(RECIPES) and r.documents[0].startswith("Banana Bread\n\nIngredients:\n- 3 ripe")


def test_txt_endoftext_and_blank_lines(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("First story.\nStill first.<|endoftext|>Second story.\n\nSame story, new paragraph.<|endoftext|>\n")
    assert load_corpus(a, stories).documents == ["First story.\nStill first.",
                                                 "Second story.\n\nSame story, new paragraph."]
    b = tmp_path / "b.txt.gz"
    b.write_bytes(gzip.compress(b"One.\n\nTwo\nlines.\n  \nThree."))
    assert load_corpus(b, stories).documents == ["One.", "Two\nlines.", "Three."]


def test_parquet(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist(RECIPES[:3]), path)
    assert len(load_corpus(path, recipes).documents) == 3


def test_limit(stories_file):
    assert len(load_corpus(stories_file, stories, limit=5).documents) == 5


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{"text": "bad\n', r":2: invalid JSON"),
    (b'{"text": "ok"}\n["a list"]\n', r":2: expected a JSON object, got list"),
    (b'{"text": "ok"}\n{"story": "x"}\n', r":2: missing field 'text'"),
    (b'{"text": "ok"}\n{"text": 5}\n', r":2: field 'text' must be str, got int"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r":2: not valid UTF-8 \(byte 0xe9"),
    (b'\n\n', r"empty corpus"),
    (b'{"text": "   "}\n', r"empty corpus"),
])
def test_bad_input_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"bad\.jsonl.*" + message):
        load_corpus(path, stories)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_corpus(tmp_path / "missing.jsonl", stories)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported file type"):
        load_corpus(tmp_path / "x.csv", stories)
    (tmp_path / "x.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="x.jsonl.gz: cannot read"):
        load_corpus(tmp_path / "x.jsonl.gz", stories)
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="cannot read as parquet"):
        load_corpus(tmp_path / "x.parquet", stories)


def test_hub_ids_are_recognised(tmp_path):
    assert is_hub_id("roneneldan/TinyStories") and is_hub_id("corbt/all-recipes")
    assert not is_hub_id("data.jsonl") and not is_hub_id(str(tmp_path))


def test_holdout_is_deterministic_and_disjoint(stories_file):
    c = load_corpus(stories_file, stories)
    train, held = split_holdout(c, fraction=0.1)
    assert len(held.documents) == 6 and train.documents + held.documents == c.documents
    assert train.fingerprint != held.fingerprint


def test_fingerprint_follows_content(tmp_path, stories_file):
    a = load_corpus(stories_file, stories)
    stories_file.write_text('{"text": "changed"}\n')
    assert load_corpus(stories_file, stories).fingerprint != a.fingerprint


def test_shared_corpora_load(shared_data):
    r = load_corpus(shared_data / "recipes.valid.jsonl.gz", recipes)
    assert len(r.documents) == 188 and all("\n\nIngredients:\n- " in d for d in r.documents)


@pytest.mark.parametrize("line, error", [
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", r"nested too deeply"),
    ('{"text": "a", "n": ' + "7" * 5000 + "}", r"a number with too many digits"),
])
def test_a_hostile_jsonl_line_is_one_error_naming_the_file_and_line(tmp_path, line, error):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=rf"^{path}:2: invalid JSON \({error}\b"):
        load_corpus(path, stories)
