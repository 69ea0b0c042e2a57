"""Every causal LM transformers builds either runs or is refused in one line: `model.blocks` finds
its decoder blocks through its own structure, and `eval`, `generate`, `export` (a checkpoint; GGUF: Llama
only) and `adapt`, with the default method (expand_branch: the checkpoint's own domain stays the original bit
for bit) and with lora, run a tiny random checkpoint of each architecture (`save_checkpoint`) on a slice of
the shared recipes."""
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from expandlm.formats.served import load_served
from expandlm.model.blocks import block_linear_names, decoder_blocks, final_norm, output_projections
from test_formats_pretrained import PROMPT, plain_ids, run, save_checkpoint

# architecture: the config fields it needs beyond SHAPE's (small heads; Gemma2 with a window that matters)
SWEEP = {"gpt2": {}, "gpt_neox": {}, "gemma": {"head_dim": 8}, "gemma2": {"head_dim": 8, "sliding_window": 16},
         "phi3": {"pad_token_id": None}, "olmo2": {}, "qwen3": {"head_dim": 8}, "granite": {}, "stablelm": {},
         "llama": {}, "mistral": {}, "qwen2": {}}
PREFIX = {"gpt2": "transformer.h.", "gpt_neox": "gpt_neox.layers."}  # every other one's: model.layers.
OUTPUTS = {"gpt2": ["attn.c_proj", "mlp.c_proj"], "gpt_neox": ["attention.dense", "mlp.dense_4h_to_h"]}
NORM = {"gpt2": "ln_f", "gpt_neox": "final_layer_norm"}
FAST_ENGINE = ("llama", "mistral")  # the rest generate with transformers, said in one line
ADAPT = ["--limit", "8", "--val-limit", "2", "--max-steps", "1", "--batch-size", "2", "--context", "64",
         "--eval-interval", "0", "--no-progress"]


@pytest.fixture(scope="module")
def recipes(shared_data):
    return shared_data / "recipes.jsonl.gz"


@pytest.fixture(scope="module", params=list(SWEEP))
def checkpoint(request, tmp_path_factory):
    """(folder, architecture): a tiny random checkpoint of each architecture of the sweep."""
    folder = tmp_path_factory.mktemp(request.param) / "base"
    save_checkpoint(folder, request.param, **SWEEP[request.param])
    return folder, request.param


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def _original(folder) -> tuple[torch.Tensor, list[int]]:
    """The checkpoint's own logits on the prompt, as transformers computes them, and the prompt's ids."""
    ids = plain_ids(AutoTokenizer.from_pretrained(folder), PROMPT)
    return _logits(AutoModelForCausalLM.from_pretrained(folder).eval(), ids), ids


def test_the_blocks_are_found_through_the_models_own_structure(checkpoint):
    folder, arch = checkpoint
    model = AutoModelForCausalLM.from_pretrained(folder)
    blocks, prefix = decoder_blocks(model)
    assert prefix == PREFIX.get(arch, "model.layers.") and len(blocks) == 2
    assert {n for n, _ in model.named_parameters() if n.startswith(prefix)} == {
        f"{prefix}{i}.{n}" for i, block in enumerate(blocks) for n, _ in block.named_parameters()}
    assert list(output_projections(model, blocks[0])) == OUTPUTS.get(
        arch, ["self_attn.o_proj", "mlp.down_proj"])
    assert final_norm(model) is model.get_decoder().get_submodule(NORM.get(arch, "norm"))
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=block_linear_names(model)))
    assert decoder_blocks(peft) == (blocks, f"base_model.model.{prefix}")


def test_eval_generate_and_export_run_every_architecture(checkpoint, shared_data, capsys, tmp_path):
    folder, arch = checkpoint
    code, out, err = run(capsys, "eval", "--model", folder, "--data", shared_data / "tinystories.valid.jsonl.gz",
                         "--max-docs", "2", "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert json.loads(out)["bpb"] > 0
    code, out, err = run(capsys, "generate", "--model", folder, "--prompt", PROMPT, "--temperature", "0",
                         "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["samples"][0]["text"].startswith(PROMPT)
    assert err == "" if arch in FAST_ENGINE else len(err.splitlines()) == 1 and "generating with transformers" in err
    code, _, err = run(capsys, "export", folder, "--out", tmp_path / "exported")
    assert code == 0, err
    original, ids = _original(folder)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval(), ids), original)
    code, _, err = run(capsys, "export", folder, "--format", "gguf", "--out", tmp_path / "m.gguf")
    if arch == "llama":
        assert code == 0, err
    else:
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"GGUF export supports Llama models, not {arch!r}" in err


@pytest.mark.parametrize("method", ["expand_branch", "lora"])
def test_adapt_grows_every_architecture_and_keeps_its_own_domain_bit_for_bit(method, checkpoint, recipes, capsys,
                                                                            tmp_path):
    folder, _ = checkpoint
    code, _, err = run(capsys, "adapt", "--base", folder, "--domain", "recipes", "--data", recipes,
                       "--strategy", method, "--out", tmp_path / "out", *ADAPT)
    assert code == 0, err
    original, ids = _original(folder)
    assert torch.equal(_logits(load_served(tmp_path / "out", device="cpu").for_domain("base"), ids), original)
    code, out, err = run(capsys, "generate", "--model", tmp_path / "out", "--domain", "recipes", "--prompt",
                         "Banana", "--temperature", "0", "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["samples"][0]["text"].startswith("Banana")


def test_blocks_that_cannot_start_as_the_identity_are_refused_in_one_line_and_grow_as_copies(recipes, capsys,
                                                                                            tmp_path):
    """Mixtral's MLP is a mixture of experts with no linear layer to zero: LLaMA Pro's init is refused, and
    a plain copy of the block before grows it."""
    save_checkpoint(tmp_path / "base", "mixtral", num_local_experts=2, num_experts_per_tok=1)
    code, _, err = run(capsys, "adapt", "--base", tmp_path / "base", "--domain", "recipes", "--data", recipes,
                       "--out", tmp_path / "out", *ADAPT)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "MixtralForCausalLM: its blocks' mlp (MixtralSparseMoeBlock) has no linear layer" in err
    assert "--option init=copy" in err
    code, _, err = run(capsys, "adapt", "--base", tmp_path / "base", "--domain", "recipes", "--data", recipes,
                       "--option", "init=copy", "--out", tmp_path / "copied", *ADAPT)
    assert code == 0, err
    original, ids = _original(tmp_path / "base")
    assert torch.equal(_logits(load_served(tmp_path / "copied", device="cpu").for_domain("base"), ids), original)


@pytest.mark.parametrize("method", ["expand_branch", "lora"])
def test_a_tokenizer_with_more_tokens_than_embedding_rows_grows(method, recipes, capsys, tmp_path):
    """A byte-level BPE without <|endoftext|> saved with a Qwen2 config: transformers loads it back as a
    Qwen2Tokenizer that adds that token, one more than the embedding's rows (which once ended adapt in an IndexError)."""
    save_checkpoint(tmp_path / "base", "qwen2", adds_bos=True)
    tokens, rows = len(AutoTokenizer.from_pretrained(tmp_path / "base")), AutoModelForCausalLM.from_pretrained(
        tmp_path / "base").get_input_embeddings().num_embeddings
    assert tokens == rows + 1
    code, out, err = run(capsys, "adapt", "--base", tmp_path / "base", "--domain", "recipes", "--data", recipes,
                         "--strategy", method, "--out", tmp_path / "out", *ADAPT)
    assert code == 0, err
    assert f"its tokenizer has {tokens:,} tokens and its embedding {rows:,} rows" in out
    original, ids = _original(tmp_path / "base")
    assert torch.equal(_logits(load_served(tmp_path / "out", device="cpu").for_domain("base"), ids), original)


def test_a_plain_checkpoint_asked_for_a_named_domain_says_to_name_it_with_base_domain(shared_data, capsys, tmp_path):
    save_checkpoint(tmp_path / "base", "llama")
    code, _, err = run(capsys, "eval", "--model", tmp_path / "base", "--domain", "stories", "--data",
                       shared_data / "tinystories.valid.jsonl.gz", "--max-docs", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "serves base, not 'stories'" in err and "--base-domain stories" in err
