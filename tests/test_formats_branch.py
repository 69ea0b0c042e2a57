"""The branch format stores only what a branch trained (`branch.safetensors`) and takes the rest from
its base's trunk: in memory too, so a base and every branch grown from it hold the trunk once. A base
that changed since is refused in one line; the branch exports whole as a standard checkpoint. Built on
a tiny random transformers checkpoint (as test_formats_pretrained builds them) grown with expand_branch."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CODE, RECIPES, write_jsonl
from expandlm.errors import UserError
from expandlm.formats.branch import WEIGHTS
from expandlm.formats.served import load_served
from test_formats_pretrained import PROMPT, plain_ids, run, save_checkpoint

TRAIN = ["--limit", "20", "--max-steps", "2", "--batch-size", "2", "--eval-interval", "0", "--no-progress"]


def _adapt(base, domain, data, out, *options):
    from expandlm.cli import main
    assert main(["adapt", "--base", str(base), "--domain", domain, "--data", str(data), "--out", str(out),
                 *TRAIN, *options]) == 0
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A checkpoint, and two branches grown from it (recipes, code) and one grown from a branch."""
    root = tmp_path_factory.mktemp("branches")
    save_checkpoint(root / "base", "llama")
    recipes = _adapt(root / "base", "recipes", write_jsonl(root / "recipes.jsonl", RECIPES), root / "recipes")
    _adapt(root / "base", "code", write_jsonl(root / "code.jsonl", [{"text": t} for t in CODE]), root / "code")
    _adapt(recipes, "code", root / "code.jsonl", root / "chain")
    return root


def _first_block_weight(model) -> torch.Tensor:
    return model.model.layers[0].self_attn.q_proj.weight


def _first_copied_block_weight(served, domain) -> torch.Tensor:
    """The weight of the branch's copy of the trunk's first block."""
    branch = served.for_domain(domain)
    first = next(i for i in range(branch.config.num_hidden_layers) if i not in served.card.details["new_layers"])
    return _first_block_weight(branch) if first == 0 else branch.model.layers[first].self_attn.q_proj.weight


def test_a_branch_stores_its_embedding_head_norm_and_new_blocks_only(grown):
    card = json.loads((grown / "recipes" / "expandlm.json").read_text())
    assert not (grown / "recipes" / "model.safetensors").exists()
    stored = load_file(grown / "recipes" / WEIGHTS)
    new = [f"model.layers.{i}." for i in card["new_layers"]]
    assert card["trunk"] == "frozen" and len(new) == 2
    blocks = {n for n in stored if n.startswith("model.layers.")}
    assert blocks and all(n.startswith(tuple(new)) for n in blocks)  # no copied block is stored
    assert set(stored) - blocks == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    whole = sum(t.numel() for t in load_served(grown / "recipes", device="cpu").export_model("recipes").state_dict().values())
    assert sum(t.numel() for t in stored.values()) < 0.8 * whole


def test_the_branch_exports_whole_and_computes_what_it_serves(grown, capsys, tmp_path):
    served = load_served(grown / "recipes", device="cpu")
    code, _, err = run(capsys, "export", grown / "recipes", "--domain", "recipes", "--out", tmp_path / "whole")
    assert code == 0, err
    exported, tok = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").eval(), AutoTokenizer.from_pretrained(tmp_path / "whole")
    ids = torch.tensor([tok("<|recipes|>Banana bread")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, served.for_domain("recipes")(input_ids=ids).logits)


def test_a_base_and_its_branches_hold_the_trunk_once(grown):
    opened = {}
    base, recipes, code, chain = (load_served(grown / name, device="cpu", opened=opened)
                                  for name in ("base", "recipes", "code", "chain"))
    trunk = _first_block_weight(base.model)
    for served, domain in ((recipes, "recipes"), (code, "code"), (chain, "code")):
        assert _first_copied_block_weight(served, domain) is trunk, domain
    assert chain.for_domain("recipes") is recipes.for_domain("recipes")  # the chain's base: the folder opened above
    alone = load_served(grown / "code", device="cpu")  # without `opened`: its own base, still shared within
    assert _first_copied_block_weight(alone, "code") is _first_block_weight(alone.for_domain("base"))


def test_a_changed_base_is_refused_in_one_line(grown, capsys, tmp_path):
    import shutil
    shutil.copytree(grown / "base", tmp_path / "base")
    shutil.copytree(grown / "recipes", tmp_path / "recipes")
    weights = load_file(tmp_path / "base" / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(weights, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="is not the model this branch was trained on"):
        load_served(tmp_path / "recipes", device="cpu")
    code, _, err = run(capsys, "generate", "--model", tmp_path / "recipes", "--domain", "recipes", "--prompt", "Banana")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "sha256" in err, err


def test_a_damaged_branch_file_is_named(grown, capsys, tmp_path):
    import shutil
    shutil.copytree(grown / "recipes", tmp_path / "recipes")
    shutil.copytree(grown / "base", tmp_path / "base")
    path = tmp_path / "recipes" / WEIGHTS
    path.write_bytes(path.read_bytes()[:200])
    code, _, err = run(capsys, "generate", "--model", tmp_path / "recipes", "--domain", "recipes", "--prompt", "Banana")
    assert code == 2 and len(err.strip().splitlines()) == 1 and WEIGHTS in err, err


def test_a_trained_trunk_stores_every_block_and_the_base_stays_exact(grown, tmp_path):
    out = _adapt(grown / "base", "recipes", grown / "recipes.jsonl", tmp_path / "trained", "--option", "trunk=trained")
    stored = load_file(out / WEIGHTS)
    base = AutoModelForCausalLM.from_pretrained(grown / "base").eval()
    assert {n for n in stored if n.startswith("model.layers.")} == {n for n in base.state_dict()
                                                                     if n.startswith("model.layers.")}
    served = load_served(out, device="cpu")
    ids = torch.tensor([plain_ids(AutoTokenizer.from_pretrained(grown / "base"), PROMPT)])
    with torch.no_grad():
        assert torch.equal(served.for_domain("base")(input_ids=ids).logits, base(input_ids=ids).logits)
