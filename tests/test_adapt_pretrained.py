"""`expandlm adapt` grows a checkpoint that transformers saved (no run.json, no expandlm.json) with the
default method, expand_branch: the new domain gets a branch of its own, and the checkpoint's own
domain stays bit for bit the original, served and exported. Methods that need the old domains' data
or one tokenizer for old and new refuse such a base in one line. Tiny random Llama, Mistral and Qwen2
checkpoints (GQA, untied heads; Qwen2's attention biases), built as in test_formats_pretrained."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import RECIPES, STORIES, write_jsonl
from expandlm.adapt import AdaptContext, make_method
from expandlm.adapt.expand_branch import shared_tokens
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


def test_the_branch_copies_the_untied_head_rows_of_shared_tokens(grown):
    base, out, _ = grown
    original, old_tok, new_tok = (AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base),
                                  AutoTokenizer.from_pretrained(out))
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert not saved.config.tie_word_embeddings and saved.config.num_key_value_heads == 2  # untied, GQA kept
    ctx = AdaptContext(old_domains=["base"], new_domain=get_domain("recipes"), new_shard=None, old_shards={},
                       tokenizer=new_tok, old_tokenizer=old_tok, base_vocab=len(old_tok), preset="tiny",
                       budget_tokens=0)
    branch = make_method("expand_branch").build(original, ctx).model
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


@pytest.mark.parametrize("method, extra, why", [
    ("replay", [], "old domains' data, and there is none of base"), ("joint", [], "old domains' data"),
    ("ewc", [], "old domains' data"),
    ("lora", [], "has no tag <|recipes|>"), ("expand", [], "has no tag <|recipes|>"),
    ("expand_paths", [], "has no tag <|recipes|>"), ("full_ft", [], "has no tag <|recipes|>"),
    ("full_ft", ["--expand-vocab", "8"], "--expand-vocab keeps the old tokenization exact only on old texts"),
])
def test_a_method_that_cannot_grow_a_pretrained_checkpoint_refuses_in_one_line(method, extra, why, recipes,
                                                                               capsys, tmp_path):
    save_checkpoint(tmp_path / "base", "llama")
    code, _, err = run(capsys, "adapt", "--base", tmp_path / "base", "--domain", "recipes", "--data", recipes,
                       "--strategy", method, "--out", tmp_path / "out", *extra, *TRAIN)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"strategy '{method}'" in err and why in err and "adapt it with expand_branch" in err


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


def test_tokenizer_auto_trains_an_own_one_over_a_pretrained_checkpoint_as_over_an_expert():
    method = make_method("expand_branch")  # own measured better on both stand-ins (benchmarks/pretrained_tokenizer.py)
    assert method.tokenizer_choice(plain_domain("base")) == "own"
    assert method.tokenizer_choice(get_domain("stories")) == "own"
    assert make_method("expand_branch", {"vocab_size": 300}).tokenizer_choice(plain_domain("base")) == "own"


def test_tokenizer_base_with_a_vocab_size_is_refused_in_one_line(recipes, capsys, tmp_path):
    save_checkpoint(tmp_path / "base", "llama")
    code, _, err = run(capsys, "adapt", "--base", tmp_path / "base", "--domain", "recipes", "--data", recipes,
                       "--option", "tokenizer=base", "--option", "vocab_size=300", "--out", tmp_path / "out", *TRAIN)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "vocab_size" in err and "tokenizer=base" in err
