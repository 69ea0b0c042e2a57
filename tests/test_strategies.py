"""Mechanics of the strategies (not their outcomes): what they add, freeze and leave unchanged."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from expandlm.adapt import AdaptSpec, adapt
from expandlm.errors import UserError
from expandlm.expert import ExpertSpec, train_expert
from expandlm.model import PRESETS, build_model
from expandlm.serving import load_served
from expandlm.strategies import STRATEGIES, make_strategy
from expandlm.strategies.ewc import EWC
from expandlm.strategies.expand import expand_blocks, new_block_positions
from expandlm.tokenizer import bytes_tokenizer
from expandlm.train import TrainConfig

FAST = dict(max_steps=4, batch_size=4, eval_interval=0, eval_docs=5, progress=False, log_interval=2)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A nano stories expert trained for a few steps, and the recipes corpus to adapt it to."""
    from tests.conftest import RECIPES, STORIES, write_jsonl
    root = tmp_path_factory.mktemp("strategies")
    stories = write_jsonl(root / "stories.jsonl", [{"text": t} for t in STORIES])
    recipes = write_jsonl(root / "recipes.jsonl", RECIPES)
    spec = ExpertSpec(domain="stories", data=str(stories), out=str(root / "base"), preset="nano",
                      cache_dir=str(root / "cache"), vocab_size=400, train=TrainConfig(**FAST))
    train_expert(spec)
    return root, recipes


def _adapt(base, strategy, name=None, **kw):
    root, recipes = base
    out = root / (name or strategy)
    options = kw.pop("options", {})
    spec = AdaptSpec(base=str(root / "base"), strategy=strategy, domain="recipes", data=str(recipes), out=str(out),
                     options=options, cache_dir=str(root / "cache"), train=TrainConfig(**{**FAST, **kw}))
    return adapt(spec), out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(tok, domain="stories"):
    return torch.tensor([[tok.bos_token_id, tok.convert_tokens_to_ids(f"<|{domain}|>"), 70, 80, 90, 100]])


def test_every_design_strategy_is_registered():
    assert {"full_ft", "lora", "joint", "replay", "ewc", "expand", "expand_paths"} <= set(STRATEGIES)


def test_strategy_options_are_checked():
    with pytest.raises(UserError, match="unknown strategy 'magic'"):
        make_strategy("magic")
    with pytest.raises(UserError, match="unknown option 'rank' \\(known: r, alpha"):
        make_strategy("lora", {"rank": 4})
    with pytest.raises(UserError, match="fraction must be between 0 and 1"):
        make_strategy("replay", {"fraction": 1.5})
    assert make_strategy("expand", {"new_blocks": "3"}).new_blocks == 3


def test_expanded_model_computes_exactly_the_base_at_init():
    tok = bytes_tokenizer()
    model = build_model(PRESETS["tiny"], tok, seed=0)
    ids = _ids(tok)
    before = _logits(model, ids)
    old, new = expand_blocks(model, new_blocks=3)
    assert model.config.num_hidden_layers == 9 and len(new) == 3 and len(old) == 6
    assert torch.equal(_logits(model, ids), before)
    for i in new:  # a copy of the block before it, with the two output projections zeroed
        assert torch.equal(model.model.layers[i].self_attn.q_proj.weight, model.model.layers[i - 1].self_attn.q_proj.weight)
        assert not model.model.layers[i].mlp.down_proj.weight.any()


def test_block_positions():
    assert new_block_positions(6, 2, "interleave") == [2, 5]
    assert new_block_positions(6, 3, "interleave") == [1, 3, 5]
    assert new_block_positions(6, 2, "end") == [5, 5]


def test_expand_trains_only_new_blocks_and_frozen_tensors_stay_bit_identical(base):
    root, _ = base
    old = AutoModelForCausalLM.from_pretrained(root / "base").state_dict()
    record, out = _adapt(base, "expand", options={"new_blocks": 2})
    new = AutoModelForCausalLM.from_pretrained(out)
    card = json.loads((out / "expandlm.json").read_text())
    assert card["domains"] == ["stories", "recipes"] and new.config.num_hidden_layers == 4
    old_layers = card["new_layers"]
    mapping = {}  # old layer index → index in the expanded model
    for i in range(4):
        if i not in old_layers:
            mapping[len(mapping)] = i
    state = new.state_dict()
    for name, tensor in old.items():
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            name = name.replace(f".layers.{i}.", f".layers.{mapping[i]}.")
        assert torch.equal(state[name], tensor), name
    trained = [state[f"model.layers.{i}.mlp.down_proj.weight"] for i in old_layers]
    assert all(t.any() for t in trained)  # the zero-initialised projections did learn
    assert record["trainable_params"] < record["total_params"] / 2


def test_expand_paths_leaves_old_domain_outputs_bit_identical(base):
    root, _ = base
    base_model = AutoModelForCausalLM.from_pretrained(root / "base")
    _, out = _adapt(base, "expand_paths")
    served = load_served(out)
    ids = _ids(served.tokenizer)
    assert torch.equal(_logits(served.for_domain("stories"), ids), _logits(base_model, ids))
    assert not torch.equal(_logits(served.for_domain("recipes"), ids), _logits(base_model, ids))
    assert torch.equal(_logits(served.for_domain("stories"), ids), _logits(base_model, ids))  # switching back


def test_lora_saves_a_peft_adapter_and_keeps_the_base(base):
    root, _ = base
    base_model = AutoModelForCausalLM.from_pretrained(root / "base")
    record, out = _adapt(base, "lora", options={"r": 4})
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), out)
    served = load_served(out)
    ids = _ids(served.tokenizer)
    assert torch.equal(_logits(served.for_domain("stories"), ids), _logits(base_model, ids))
    assert torch.allclose(_logits(served.for_domain("recipes"), ids), _logits(peft_model, ids))
    assert record["trainable_params"] < record["total_params"]


@pytest.mark.parametrize("strategy, options", [("full_ft", {}), ("replay", {"fraction": 0.3}),
                                               ("joint", {"from_scratch": True}), ("joint", {"from_scratch": False}),
                                               ("ewc", {"lam": 10.0, "fisher_batches": 2})])
def test_whole_model_strategies_produce_a_standard_checkpoint(base, strategy, options):
    record, out = _adapt(base, strategy, name=f"{strategy}-{len(options)}-{options.get('from_scratch')}",
                         options=options)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert record["trainable_params"] == record["total_params"] == sum(p.numel() for p in model.parameters())
    assert set(record["bpb"]) == {"stories", "recipes"} and record["tokens"] == 4 * 4 * 128
    assert set(record["forgetting"]) == {"stories"}


def test_mixture_batches_draw_each_shard_by_weight(base):
    from expandlm.corpus import load_corpus
    from expandlm.domains import get_domain
    from expandlm.shards import PackedBatches, build_shard
    root, _ = base
    tok = load_served(root / "base").tokenizer
    recipes_tag, stories_tag = tok.convert_tokens_to_ids("<|recipes|>"), tok.convert_tokens_to_ids("<|stories|>")
    shards = [build_shard(load_corpus(base[1], get_domain("recipes")), tok, root / "cache"),
              build_shard(load_corpus(root / "stories.jsonl", get_domain("stories")), tok, root / "cache")]
    batches = PackedBatches(shards, 16, 64, seed=0, weights=[0.5, 0.5])
    batch = batches.batch(0)
    assert torch.equal(batch, PackedBatches(shards, 16, 64, seed=0, weights=[0.5, 0.5]).batch(0))
    tags = set(batch.flatten().tolist())
    assert recipes_tag in tags or stories_tag in tags
    only_new = PackedBatches(shards, 16, 64, seed=0, weights=[1.0, 0.0]).batch(0)
    assert stories_tag not in set(only_new.flatten().tolist())


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it(base):
    root, _ = base
    served = load_served(root / "base")
    model = served.model
    strategy = EWC(lam=1.0, fisher_batches=2, fisher_batch_size=2)
    from expandlm.corpus import load_corpus
    from expandlm.domains import get_domain
    from expandlm.shards import build_shard
    from expandlm.strategies import AdaptContext
    shard = build_shard(load_corpus(root / "stories.jsonl", get_domain("stories")), served.tokenizer, root / "cache")
    ctx = AdaptContext(root / "base", ["stories"], get_domain("recipes"), shard, {"stories": shard},
                       served.tokenizer, len(served.tokenizer), "nano")
    strategy.build(model, ctx)
    batch = torch.randint(0, 300, (2, 17))
    from expandlm.train import causal_lm_loss
    assert torch.isclose(strategy.loss(model, batch), causal_lm_loss(model, batch))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert strategy.loss(model, batch) > causal_lm_loss(model, batch)
    assert all((f >= 0).all() for _, f in strategy.anchor.values())


def test_adapting_to_a_domain_already_served_is_refused(base):
    root, recipes = base
    spec = AdaptSpec(base=str(root / "base"), strategy="full_ft", domain="stories", data=str(recipes),
                     out=str(root / "again"), train=TrainConfig(**FAST))
    with pytest.raises(UserError, match="already serves 'stories'"):
        adapt(spec)
