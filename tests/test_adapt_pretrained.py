"""`expandlm adapt` grows a checkpoint that transformers saved (no run.json, no expandlm.json) with every
method. The default, expand_branch, gives the new domain a branch of its own (on the checkpoint's
tokenizer plus the domain's tag, or with `tokenizer=own` a tokenizer of its own); lora and expand_paths make it
a plain domain; the rest append its tag. Where the method keeps old domains (expand_branch, lora,
expand_paths) the checkpoint's own domain stays bit for bit the original, served and exported; replay,
joint and ewc train on its text from --base-data and refuse in one line without it. Tiny random Llama,
Mistral and Qwen2 checkpoints (GQA, untied heads; Qwen2's attention biases and no BOS), built as in
test_formats_pretrained."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import RECIPES, STORIES, write_jsonl
from expandlm.adapt import AdaptContext, make_method
from expandlm.adapt.expand_branch import shared_tokens
from expandlm.data.corpus import load_corpus
from expandlm.domains import get_domain, plain_domain
from expandlm.formats.served import load_served
from test_formats_pretrained import PROMPT, plain_ids, run, save_checkpoint, transformers_greedy

TRAIN = ["--limit", "20", "--max-steps", "3", "--batch-size", "2", "--eval-interval", "0", "--no-progress"]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "recipes.jsonl", RECIPES)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def grown(request, tmp_path_factory, recipes):
    """(the original checkpoint, the adapted folder, the architecture), adapted with the default method."""
    root = tmp_path_factory.mktemp(f"grown-{request.param}")
    save_checkpoint(root / "base", request.param)
    from expandlm.cli import main
    assert main(["adapt", "--base", str(root / "base"), "--domain", "recipes", "--data", str(recipes),
                 "--out", str(root / "out"), *TRAIN]) == 0
    return root / "base", root / "out", request.param


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_the_adapted_folder_serves_both_domains_with_a_finite_bpb_for_the_new(grown):
    _, out, _ = grown
    card = json.loads((out / "expandlm.json").read_text())
    assert card["domains"] == ["base", "recipes"] and card["plain"] == ["base"] and card["format"] == "branch"
    bpb = json.loads((out / "run.json").read_text())["bpb"]
    assert list(bpb) == ["recipes"] and math.isfinite(bpb["recipes"])  # the base's data is unknown: not measured


def test_the_base_domain_is_the_original_checkpoint_bit_for_bit(grown, capsys, tmp_path):
    base, out, _ = grown
    tok = AutoTokenizer.from_pretrained(base)
    ids = plain_ids(tok, PROMPT)
    original = _logits(AutoModelForCausalLM.from_pretrained(base).eval(), ids)
    served = load_served(out, device="cpu")
    assert torch.equal(_logits(served.for_domain("base"), ids), original)
    code, _, err = run(capsys, "export", out, "--domain", "base", "--out", tmp_path / "exported")
    assert code == 0, err
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval(), ids), original)


def test_the_branch_copies_the_untied_head_rows_of_shared_tokens(grown, recipes):
    base, out, _ = grown
    original, old_tok = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    saved = load_served(out, device="cpu").export_model("recipes")
    assert not saved.config.tie_word_embeddings and saved.config.num_key_value_heads == 2  # untied, GQA kept
    method = make_method("expand_branch", {"tokenizer": "own"})  # a pretrained checkpoint's default is its own
    new_tok = method.new_tokenizer(load_corpus(str(recipes), get_domain("recipes")).documents, old_tok, get_domain("recipes"), plain_domain("base"))
    ctx = AdaptContext(old_domains=["base"], new_domain=get_domain("recipes"), new_shard=None, old_shards={},
                       tokenizer=new_tok, old_tokenizer=old_tok, base_vocab=len(old_tok), preset="tiny",
                       budget_tokens=0)
    branch = method.build(original, ctx).model
    head, embedding = branch.get_output_embeddings().weight, branch.get_input_embeddings().weight
    assert head is not embedding and head.requires_grad and head.shape[0] == len(new_tok)
    pairs = shared_tokens(old_tok, new_tok)
    assert any(new_id != old_id for new_id, old_id in pairs)  # rows that a plain resize would misplace
    for new_id, old_id in pairs:
        assert torch.equal(head[new_id], original.lm_head.weight[old_id])
        assert torch.equal(embedding[new_id], original.model.embed_tokens.weight[old_id])


def test_generate_answers_both_domains_and_the_base_as_transformers_does(grown, capsys):
    base, out, _ = grown
    code, text, err = run(capsys, "generate", "--model", out, "--domain", "base", "--prompt", PROMPT,
                          "--temperature", "0", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    assert json.loads(text)["samples"][0]["text"] == transformers_greedy(base, PROMPT, 8)[0]
    code, text, err = run(capsys, "generate", "--model", out, "--domain", "recipes", "--prompt", "Banana",
                          "--temperature", "0", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    assert json.loads(text)["samples"][0]["text"].startswith("Banana")


def test_a_grown_checkpoint_grows_again_and_keeps_both_domains(grown, tmp_path):
    base, out, _ = grown
    stories = write_jsonl(tmp_path / "stories.jsonl", [{"text": t} for t in STORIES])
    from expandlm.cli import main
    assert main(["adapt", "--base", str(out), "--domain", "stories", "--data", str(stories),
                 "--out", str(tmp_path / "chain"), *TRAIN]) == 0
    record = json.loads((tmp_path / "chain" / "run.json").read_text())
    assert record["forgetting"] == {"recipes": 0.0} and math.isfinite(record["bpb"]["stories"])
    ids = plain_ids(AutoTokenizer.from_pretrained(base), PROMPT)
    chained = load_served(tmp_path / "chain", device="cpu").for_domain("base")
    assert torch.equal(_logits(chained, ids), _logits(AutoModelForCausalLM.from_pretrained(base).eval(), ids))


# Every other method over a pretrained base: lora and expand_paths pick the weights by domain, so the new
# domain is plain and the base stays exact; the rest append a tag and change what serves the base.
KEEPS_BASE = ["lora", "expand_paths"]
CHANGES_BASE = ["full_ft", "expand", "replay", "joint", "ewc"]
FAST = {"ewc": ["--option", "fisher_batches=2"]}
FEW = [*TRAIN[:2], "--max-steps", "2", *TRAIN[4:]]


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "stories.jsonl", [{"text": t} for t in STORIES])


@pytest.fixture(scope="module")
def grown_by(tmp_path_factory, recipes, stories):
    """(architecture, method) → (the original checkpoint, the folder it grew into with recipes, --base-data
    being a sample of the base's text); each made once."""
    made = {}

    def grow(arch: str, method: str):
        if (arch, method) not in made:
            root = tmp_path_factory.mktemp(f"{arch}-{method}")
            save_checkpoint(root / "base", arch)
            from expandlm.cli import main
            assert main(["adapt", "--base", str(root / "base"), "--domain", "recipes", "--data", str(recipes),
                         "--method", method, "--base-data", str(stories), "--out", str(root / "out"),
                         *FAST.get(method, []), *FEW]) == 0
            made[arch, method] = root / "base", root / "out"
        return made[arch, method]
    return grow


EVERY = [(arch, method) for method in KEEPS_BASE + CHANGES_BASE for arch in ("llama", "qwen2")]


@pytest.mark.parametrize("arch, method", EVERY)
def test_every_method_grows_a_pretrained_checkpoint_and_measures_the_base_with_base_data(arch, method, grown_by):
    _, out = grown_by(arch, method)
    card = json.loads((out / "expandlm.json").read_text())
    assert card["domains"] == ["base", "recipes"] and card["method"] == method
    assert card["plain"] == (["base", "recipes"] if method in KEEPS_BASE else ["base"])
    record = json.loads((out / "run.json").read_text())
    assert record["domain_data"]["base"]["train"].endswith("stories.jsonl")
    assert math.isfinite(record["bpb"]["recipes"]) and math.isfinite(record["bpb"]["base"])
    if method in KEEPS_BASE:  # the base is measured before and after: exactly no change
        assert record["forgetting"] == {"base": 0.0}
    else:
        assert record["forgetting"]["base"] != 0.0 and len(AutoTokenizer.from_pretrained(out)) == 321  # + <|recipes|>


@pytest.mark.parametrize("arch, method", [(a, m) for a, m in EVERY if m in KEEPS_BASE])
def test_the_base_stays_the_original_served_and_exported_where_the_method_keeps_it(arch, method, grown_by,
                                                                                   capsys, tmp_path):
    base, out = grown_by(arch, method)
    ids = plain_ids(AutoTokenizer.from_pretrained(base), PROMPT)
    original = _logits(AutoModelForCausalLM.from_pretrained(base).eval(), ids)
    assert torch.equal(_logits(load_served(out, device="cpu").for_domain("base"), ids), original)
    code, _, err = run(capsys, "export", out, "--domain", "base", "--out", tmp_path / "exported")
    assert code == 0, err
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval(), ids), original)


@pytest.mark.parametrize("arch, method", EVERY)
def test_generate_answers_the_new_domain_of_every_method(arch, method, grown_by, capsys):
    _, out = grown_by(arch, method)
    code, text, err = run(capsys, "generate", "--model", out, "--domain", "recipes", "--prompt", "Banana",
                          "--temperature", "0", "--max-new-tokens", "6", "--json")
    assert code == 0, err
    assert json.loads(text)["samples"][0]["text"].startswith("Banana")


def test_base_domain_names_the_checkpoints_own_domain_in_the_card(recipes, capsys, tmp_path):
    save_checkpoint(tmp_path / "base", "llama")
    code, _, err = run(capsys, "adapt", "--base", tmp_path / "base", "--base-domain", "general", "--domain",
                       "recipes", "--data", recipes, "--strategy", "expand_paths", "--out", tmp_path / "out", *FEW)
    assert code == 0, err
    card = json.loads((tmp_path / "out" / "expandlm.json").read_text())
    assert card["domains"] == ["general", "recipes"] and card["plain"] == ["general", "recipes"]
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert list(record["bpb"]) == ["recipes"] and record["forgetting"] == {}  # no --base-data: the base unmeasured
    assert load_served(tmp_path / "out", device="cpu").domain("general").plain


@pytest.mark.parametrize("method, extra, why", [
    ("replay", [], "none of base (a checkpoint's own, which expandlm did not train); give a sample of its text with "
                   "--base-data FILE"),
    ("joint", [], "give a sample of its text with --base-data FILE"), ("ewc", [], "--base-data FILE"),
    ("full_ft", ["--expand-vocab", "8"], "--expand-vocab rebuilds the tokenizer with expandlm's own BOS, EOS"),
])
def test_what_cannot_grow_a_pretrained_checkpoint_refuses_in_one_line(method, extra, why, recipes, capsys, tmp_path):
    save_checkpoint(tmp_path / "base", "llama")
    code, _, err = run(capsys, "adapt", "--base", tmp_path / "base", "--domain", "recipes", "--data", recipes,
                       "--strategy", method, "--out", tmp_path / "out", *extra, *TRAIN)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert why in err


def test_base_data_for_a_model_whose_data_is_recorded_is_refused_in_one_line(grown_by, recipes, stories, capsys,
                                                                             tmp_path):
    _, out = grown_by("llama", "replay")  # its run.json records base's data and recipes'
    code, _, err = run(capsys, "adapt", "--base", out, "--domain", "stories", "--base-data", stories,
                       "--out", tmp_path / "out", *TRAIN)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("expandlm: error: --base-data:") and "records the data of every domain" in err


def test_a_tag_takes_a_padded_row_of_a_checkpoint_whose_embedding_outgrows_its_tokenizer(recipes, capsys, tmp_path):
    """Qwen2's embedding has more rows than its tokenizer has tokens (padded to a multiple): the tag a
    method appends takes the first padded row, started at the mean of the tokens' rows."""
    save_checkpoint(tmp_path / "base", "qwen2")
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    tokens = len(AutoTokenizer.from_pretrained(tmp_path / "base"))
    original.resize_token_embeddings(tokens + 8, mean_resizing=False)
    original.save_pretrained(tmp_path / "base")
    code, _, err = run(capsys, "adapt", "--base", tmp_path / "base", "--domain", "recipes", "--data", recipes,
                       "--strategy", "full_ft", "--lr", "1e-12", "--out", tmp_path / "out", *TRAIN)  # rows as started
    assert code == 0, err
    adapted = load_served(tmp_path / "out", device="cpu")
    tag = adapted.tokenizer.convert_tokens_to_ids("<|recipes|>")
    rows = adapted.model.get_input_embeddings().weight
    assert tag == tokens and rows.shape[0] == tokens + 8
    assert torch.allclose(rows[tag], original.get_input_embeddings().weight[:tokens].mean(dim=0))
    assert torch.allclose(rows[tag + 1:], original.get_input_embeddings().weight[tag + 1:])


# -- the branch's tokenizer: its own, or the checkpoint's ------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # a BOS the tokenizer adds; none, only an EOS
def test_tokenizer_base_grows_a_branch_on_the_checkpoints_tokenizer_plus_the_tag(arch, recipes, capsys, tmp_path):
    save_checkpoint(tmp_path / "base", arch)
    code, _, err = run(capsys, "adapt", "--base", tmp_path / "base", "--domain", "recipes", "--data", recipes,
                       "--option", "tokenizer=base", "--out", tmp_path / "out", *TRAIN)
    assert code == 0, err
    old_tok, served = AutoTokenizer.from_pretrained(tmp_path / "base"), load_served(tmp_path / "out", device="cpu")
    new_tok = served.tokenizer_for("recipes")
    assert new_tok.get_vocab() == {**old_tok.get_vocab(), "<|recipes|>": len(old_tok)}
    assert new_tok.eos_token == old_tok.eos_token and served.card.details["tokenizer"] == "base"
    ids = plain_ids(old_tok, PROMPT)
    original = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval(), ids)
    assert torch.equal(_logits(served.for_domain("base"), ids), original)
    code, text, err = run(capsys, "generate", "--model", tmp_path / "out", "--domain", "recipes", "--prompt", "Banana",
                          "--temperature", "0", "--max-new-tokens", "8", "--json")
    assert code == 0, err
    assert json.loads(text)["samples"][0]["text"].startswith("Banana")


def test_tokenizer_base_starts_the_branch_from_every_row_of_the_checkpoint_and_a_fresh_tag(tmp_path):
    save_checkpoint(tmp_path / "base", "llama")
    original, old_tok = AutoModelForCausalLM.from_pretrained(tmp_path / "base"), AutoTokenizer.from_pretrained(tmp_path / "base")
    method, recipes = make_method("expand_branch", {"tokenizer": "base"}), get_domain("recipes")
    new_tok = method.new_tokenizer(["Banana bread"], old_tok, recipes, plain_domain("base"))
    ctx = AdaptContext(old_domains=["base"], new_domain=recipes, new_shard=None, old_shards={}, tokenizer=new_tok,
                       old_tokenizer=old_tok, base_vocab=len(old_tok), preset="tiny", budget_tokens=0)
    branch, n = method.build(original, ctx).model, len(old_tok)
    for matrix, old in ((branch.get_input_embeddings(), original.model.embed_tokens),
                        (branch.get_output_embeddings(), original.lm_head)):
        assert matrix.weight.shape[0] == n + 1 and torch.equal(matrix.weight[:n], old.weight)
        assert not any(torch.equal(matrix.weight[n], row) for row in old.weight)  # the tag's row: fresh


def test_tokenizer_auto_keeps_a_pretrained_checkpoints_and_trains_an_own_one_over_an_expert():
    method = make_method("expand_branch")  # as measured on SmolLM2-135M (benchmarks/real_model.py)
    assert method.tokenizer_choice(plain_domain("base")) == "base"
    assert method.tokenizer_choice(get_domain("stories")) == "own"
    assert make_method("expand_branch", {"vocab_size": 300}).tokenizer_choice(plain_domain("base")) == "own"


def test_tokenizer_base_with_a_vocab_size_is_refused_in_one_line(recipes, capsys, tmp_path):
    save_checkpoint(tmp_path / "base", "llama")
    code, _, err = run(capsys, "adapt", "--base", tmp_path / "base", "--domain", "recipes", "--data", recipes,
                       "--option", "tokenizer=base", "--option", "vocab_size=300", "--out", tmp_path / "out", *TRAIN)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "vocab_size" in err and "tokenizer=base" in err
