"""Strategies: what each one adds, freezes and leaves unchanged, that its options change what trains,
and that serving a domain (a view) and exporting it (a standard checkpoint) compute the same thing."""
import json
import threading

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from expandlm.adapt.run import AdaptSpec, adapt
from expandlm.data.corpus import load_corpus
from expandlm.domains import get_domain
from expandlm.errors import UserError
from expandlm.training.expert import ExpertSpec, train_expert
from expandlm.inference.generate import SamplingConfig, generate
from expandlm.model.llama import PRESETS, build_model, count_params
from expandlm.formats.served import load_served
from expandlm.data.shards import PackedBatches, build_shard
from expandlm.adapt import METHODS, AdaptContext, make_method
from expandlm.formats import FORMATS
from expandlm.adapt.expand import expand_blocks, new_block_positions
from expandlm.adapt.expand_branch import shared_tokens
from expandlm.data.tokenizer import bytes_tokenizer, load_tokenizer, train_bpe
from expandlm.training.loop import TrainConfig, causal_lm_loss

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


def _adapt(base, strategy, name=None, options=None, expand_vocab=0, **kw):
    root, recipes = base
    out = root / (name or strategy)
    spec = AdaptSpec(base=str(root / "base"), method=strategy, domain="recipes", data=str(recipes), out=str(out),
                     options=options or {}, expand_vocab=expand_vocab, cache_dir=str(root / "cache"),
                     train=TrainConfig(**{**FAST, **kw}))
    return adapt(spec).to_json(), out


def _context(base, tokenizer):
    root, recipes = base
    shard = lambda path, d: build_shard(load_corpus(path, get_domain(d)), tokenizer, root / "cache")  # noqa: E731
    return AdaptContext(["stories"], get_domain("recipes"), shard(recipes, "recipes"),
                        {"stories": shard(root / "stories.jsonl", "stories")}, tokenizer, tokenizer, len(tokenizer), "nano")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(tok, domain="stories"):
    return torch.tensor([[tok.bos_token_id, tok.convert_tokens_to_ids(f"<|{domain}|>"), 70, 80, 90, 100]])


def _greedy(model, tok, domain, n=12):
    return generate(model, tok, get_domain(domain), "", 1, SamplingConfig(temperature=0, max_new_tokens=n))[0].text


# -- options ---------------------------------------------------------------------------------------

def test_every_method_builds_with_its_defaults_and_names_a_format_that_exists():
    assert set(METHODS) == {"full_ft", "lora", "joint", "replay", "ewc", "expand", "expand_paths", "expand_branch"}
    for name, cls in METHODS.items():
        assert make_method(name).options == cls.Options()
        assert cls.format in FORMATS, name
    with pytest.raises(UserError, match="make it with `expandlm merge`"):  # arrow is a format, not a method
        make_method("arrow")


def test_strategy_options_are_typed_and_checked():
    with pytest.raises(UserError, match="unknown method 'magic'"):
        make_method("magic")
    with pytest.raises(UserError, match=r"unknown key 'rank' \(known keys: r, alpha"):
        make_method("lora", {"rank": 4})
    with pytest.raises(UserError, match=r"'fraction': input should be less than 1, got 1.5"):
        make_method("replay", {"fraction": 1.5})
    with pytest.raises(UserError, match=r"'position': input should be 'interleave' or 'end'"):
        make_method("expand", {"position": "middle"})
    assert make_method("expand", {"new_blocks": "3"}).options.new_blocks == 3
    assert make_method("joint", {"from_scratch": "false"}).options.from_scratch is False


def test_capabilities_are_declared_not_name_checked():
    assert not METHODS["lora"].supports_vocab_expansion and METHODS["expand"].supports_vocab_expansion
    assert METHODS["expand_paths"].keeps_old_domains and METHODS["lora"].keeps_old_domains
    assert not METHODS["full_ft"].keeps_old_domains


# -- expansion -------------------------------------------------------------------------------------

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


@pytest.mark.parametrize("options, new_layers", [({"new_blocks": 1}, [2]), ({"new_blocks": 2}, [1, 3]),
                                                 ({"new_blocks": 2, "position": "end"}, [2, 3])])
def test_expand_options_change_what_trains(base, options, new_layers):
    model = AutoModelForCausalLM.from_pretrained(base[0] / "base")
    block = count_params(model.model.layers[0])
    adapted = make_method("expand", options).build(model, _context(base, load_served(base[0] / "base").tokenizer))
    assert adapted.state["new_layers"] == new_layers
    trainable = {n.split(".")[2] for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable == {str(i) for i in new_layers}
    assert count_params(adapted.model, trainable_only=True) == block * options["new_blocks"]


def test_expand_trains_only_new_blocks_and_frozen_tensors_stay_bit_identical(base):
    root, _ = base
    old = AutoModelForCausalLM.from_pretrained(root / "base").state_dict()
    record, out = _adapt(base, "expand", options={"new_blocks": 2})
    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    card = json.loads((out / "expandlm.json").read_text())
    assert card["domains"] == ["stories", "recipes"] and card["new_layers"] == [1, 3]
    mapping = {0: 0, 1: 2}  # old layer index → index in the expanded model
    for name, tensor in old.items():
        if ".layers." in name:
            i = int(name.split(".layers.")[1].split(".")[0])
            name = name.replace(f".layers.{i}.", f".layers.{mapping[i]}.")
        assert torch.equal(state[name], tensor), name
    assert all(state[f"model.layers.{i}.mlp.down_proj.weight"].any() for i in card["new_layers"])  # they learned
    assert record["trainable_params"] == 2 * count_params(AutoModelForCausalLM.from_pretrained(root / "base").model.layers[0])


@pytest.fixture(scope="module")
def paths(base):
    return _adapt(base, "expand_paths")[1]


def test_expand_paths_serves_old_domains_bit_identically_through_a_view(base, paths):
    base_model = AutoModelForCausalLM.from_pretrained(base[0] / "base")
    served = load_served(paths)
    ids = _ids(served.tokenizer)
    stories, recipes = served.for_domain("stories"), served.for_domain("recipes")
    assert torch.equal(_logits(stories, ids), _logits(base_model, ids))
    assert not torch.equal(_logits(recipes, ids), _logits(base_model, ids))
    assert torch.equal(_logits(stories, ids), _logits(base_model, ids))  # the recipes call changed nothing
    # the plain model (no domain active) runs every block: the new domain's path
    assert torch.equal(_logits(served.model, ids), _logits(recipes, ids))


def test_a_model_moved_after_a_domain_is_selected_moves_every_block(paths):
    served = load_served(paths)
    stories = served.for_domain("stories")
    served.model.to(torch.float64)
    assert {p.dtype for p in served.model.parameters()} == {torch.float64}
    ids = _ids(served.tokenizer)
    assert _logits(stories, ids).dtype == torch.float64
    assert _logits(served.for_domain("recipes"), ids).dtype == torch.float64


def test_concurrent_requests_for_two_domains_get_what_each_gets_alone(paths):
    served = load_served(paths)
    alone = {d: _greedy(served.for_domain(d), served.tokenizer, d, 40) for d in served.domains}
    together, barrier = {}, threading.Barrier(len(alone))

    def ask(domain):
        barrier.wait()
        for _ in range(3):
            together.setdefault(domain, set()).add(_greedy(served.for_domain(domain), served.tokenizer, domain, 40))

    threads = [threading.Thread(target=ask, args=(d,)) for d in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == {d: {text} for d, text in alone.items()}


def test_export_writes_each_domain_as_a_standard_checkpoint(base, paths, tmp_path, capsys):
    from expandlm.cli import main
    base_model = AutoModelForCausalLM.from_pretrained(base[0] / "base")
    served = load_served(paths)
    for domain in served.domains:
        assert main(["export", str(paths), "--domain", domain, "--out", str(tmp_path / domain)]) == 0
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / domain)
        tok = AutoTokenizer.from_pretrained(tmp_path / domain)
        ids = _ids(tok, domain)
        assert torch.equal(_logits(exported, ids), _logits(served.for_domain(domain), ids))
        assert _greedy(exported, tok, domain) == _greedy(served.for_domain(domain), served.tokenizer, domain)
    stories = AutoModelForCausalLM.from_pretrained(tmp_path / "stories")
    assert stories.config.num_hidden_layers == base_model.config.num_hidden_layers
    assert torch.equal(_logits(stories, _ids(served.tokenizer)), _logits(base_model, _ids(served.tokenizer)))
    assert main(["export", str(paths), "--domain", "poems", "--out", str(tmp_path / "x")]) == 2
    assert "unknown domain 'poems'" in capsys.readouterr().err
    assert main(["export", str(paths), "--domain", "code", "--out", str(tmp_path / "x")]) == 2
    assert "serves stories, recipes, not 'code'" in capsys.readouterr().err


def test_a_model_whose_strategy_cannot_be_adapted_again_is_refused(base, paths):
    root, recipes = base
    spec = AdaptSpec(base=str(paths), method="full_ft", domain="code", data=str(recipes),
                     out=str(root / "again-paths"), train=TrainConfig(**FAST))
    with pytest.raises(UserError, match="adapting a expand_paths model again is not supported by the full_ft "
                                        "method .* adapt it with expand_branch"):
        adapt(spec)


# -- LoRA ------------------------------------------------------------------------------------------

def test_lora_saves_a_peft_adapter_and_keeps_the_base(base, tmp_path):
    root, _ = base
    base_model = AutoModelForCausalLM.from_pretrained(root / "base")
    record, out = _adapt(base, "lora", options={"r": 4})
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), out)
    served = load_served(out)
    ids = _ids(served.tokenizer)
    recipes = served.for_domain("recipes")
    assert torch.equal(_logits(served.for_domain("stories"), ids), _logits(base_model, ids))
    assert torch.equal(_logits(recipes, ids), _logits(peft_model, ids))
    assert not torch.equal(_logits(recipes, ids), _logits(base_model, ids))
    for domain in served.domains:  # exported: the base itself, and the adapter merged in
        served.export(domain, tmp_path / domain)
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / domain)
        assert torch.allclose(_logits(exported, ids), _logits(served.for_domain(domain), ids), atol=1e-5)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "stories"), ids), _logits(base_model, ids))


def test_lora_target_modules_decide_which_layers_get_adapters(base):
    served = load_served(base[0] / "base")
    adapted = make_method("lora", {"r": 2, "target_modules": ["q_proj", "v_proj"]}).build(
        served.model, _context(base, served.tokenizer))
    trainable = {n.split(".")[-4] for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "v_proj"}
    dim = served.model.config.hidden_size
    assert count_params(adapted.model, trainable_only=True) == 2 * 2 * 2 * (dim + dim)  # 2 layers × q,v × A,B


def test_lora_with_vocabulary_expansion_is_refused(base):
    with pytest.raises(UserError, match="--expand-vocab is not supported by the lora method"):
        _adapt(base, "lora", name="lora-vocab", expand_vocab=16)


# -- whole-model strategies ------------------------------------------------------------------------

def _row_domains(batch, tok):
    stories, recipes = tok.convert_tokens_to_ids("<|stories|>"), tok.convert_tokens_to_ids("<|recipes|>")
    return [("stories" if stories in row else "recipes" if recipes in row else None) for row in batch.tolist()]


@pytest.mark.parametrize("strategy, options, new_share", [("replay", {"fraction": 0.3}, 0.7),
                                                          ("joint", {"new_share": 0.25}, 0.25),
                                                          ("full_ft", {}, 1.0)])
def test_mixture_proportions_measured_on_drawn_batches(base, strategy, options, new_share):
    tok = load_served(base[0] / "base").tokenizer
    ctx = _context(base, tok)
    mixture = make_method(strategy, options).mixture(ctx)
    batches = PackedBatches([s for s, _ in mixture], 128, 16, seed=0,  # every window holds a domain tag
                            weights=[w for _, w in mixture] if len(mixture) > 1 else None)
    rows = [d for m in range(40) for d in _row_domains(batches.batch(m), tok)]
    assert None not in rows
    assert abs(rows.count("recipes") / len(rows) - new_share) < 0.05


def test_joint_from_scratch_starts_from_fresh_weights_and_continued_from_the_base(base):
    served = load_served(base[0] / "base")
    ctx = _context(base, served.tokenizer)
    ids = _ids(served.tokenizer)
    before = _logits(served.model, ids)
    fresh = make_method("joint", {"from_scratch": True}).build(served.model, ctx).model
    continued = make_method("joint", {"from_scratch": False}).build(served.model, ctx).model
    assert fresh is not served.model and not torch.equal(_logits(fresh, ids), before)
    assert continued is served.model


def test_ewc_penalty_is_zero_at_the_anchor_and_scales_with_lambda(base):
    served = load_served(base[0] / "base")
    ctx = _context(base, served.tokenizer)
    strategy = make_method("ewc", {"lam": 1.0, "fisher_batches": 2, "fisher_batch_size": 2})
    adapted = strategy.build(served.model, ctx)
    model = adapted.model
    batch = torch.randint(0, 300, (2, 17))
    assert torch.equal(strategy.loss(adapted, model, batch), causal_lm_loss(model, batch))
    fisher = torch.cat([f.flatten() for _, f in adapted.state["anchor"].values()])
    assert torch.isclose(fisher.mean(), torch.tensor(1.0)) and fisher.std() > 0  # normalised to mean 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    one = strategy.penalty(adapted, model)
    three = make_method("ewc", {"lam": 3.0}).penalty(adapted, model)
    assert one > 0 and torch.isclose(three, 3 * one)


@pytest.mark.parametrize("strategy, options", [("full_ft", {}), ("replay", {"fraction": 0.3}),
                                               ("joint", {"from_scratch": True}), ("ewc", {"lam": 10.0, "fisher_batches": 2})])
def test_whole_model_strategies_produce_a_standard_checkpoint(base, strategy, options):
    record, out = _adapt(base, strategy, name=f"{strategy}-whole", options=options)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert record["trainable_params"] == record["total_params"] == sum(p.numel() for p in model.parameters())
    assert set(record["bpb"]) == {"stories", "recipes"} and record["tokens"] == 4 * 4 * 128
    assert record["card"]["options"] == {**make_method(strategy).options.__dict__, **options}


def test_adapting_to_a_domain_already_served_is_refused(base):
    root, recipes = base
    spec = AdaptSpec(base=str(root / "base"), method="full_ft", domain="stories", data=str(recipes),
                     out=str(root / "again"), train=TrainConfig(**FAST))
    with pytest.raises(UserError, match="already serves 'stories'"):
        adapt(spec)


# -- a branch per new domain -----------------------------------------------------------------------

def test_expand_branch_gives_the_new_domain_its_own_tokenizer_embedding_norm_and_blocks(base, tmp_path):
    root, _ = base
    base_model = AutoModelForCausalLM.from_pretrained(root / "base")
    record, out = _adapt(base, "expand_branch", options={"new_blocks": 1, "vocab_size": 350})
    served = load_served(out)
    old_tok, new_tok = served.tokenizer_for("stories"), served.tokenizer_for("recipes")
    assert len(old_tok) == 400 and len(new_tok) == 350 and AutoTokenizer.from_pretrained(out).vocab == new_tok.vocab
    dim = base_model.config.hidden_size
    block = count_params(base_model.model.layers[0])
    assert record["trainable_params"] == 350 * dim + dim + block  # embedding (= head), final norm, one block
    ids = _ids(old_tok)
    assert torch.equal(_logits(served.for_domain("stories"), ids), _logits(base_model, ids))
    recipes = served.for_domain("recipes")
    assert recipes.config.vocab_size == 350 and recipes.config.num_hidden_layers == 3
    trained = recipes.state_dict()
    for name, tensor in base_model.state_dict().items():  # the old blocks inside the branch: frozen
        if name.startswith("model.layers.0."):
            assert torch.equal(trained[name], tensor), name
    for domain in served.domains:
        served.export(domain, tmp_path / domain)
        exported, tok = AutoModelForCausalLM.from_pretrained(tmp_path / domain), AutoTokenizer.from_pretrained(tmp_path / domain)
        assert torch.equal(_logits(exported, _ids(tok, domain)), _logits(served.for_domain(domain), _ids(tok, domain)))
        assert _greedy(exported, tok, domain) == _greedy(served.for_domain(domain), served.tokenizer_for(domain), domain)
    assert set(record["bpb"]) == {"stories", "recipes"} and record["forgetting"] == {"stories": 0.0}
    assert served.card.details["trunk"] == "frozen"  # 4 steps: far fewer tokens than the old model has parameters


def _branch(base, tokenizer=None, budget=None, **options):
    root, _ = base
    old_tok = load_tokenizer(root / "base")
    ctx = _context(base, old_tok)
    ctx.tokenizer, ctx.budget_tokens = tokenizer or old_tok, budget
    strategy = make_method("expand_branch", {"new_blocks": 1, **options})
    return strategy.build(AutoModelForCausalLM.from_pretrained(root / "base"), ctx), ctx


def test_expand_branch_block_inits(base):
    (zero, _), (copied, _), (fresh, _) = (_branch(base, init=i) for i in ("zero", "copy", "random"))
    new = zero.state["new_layers"][0]
    before = lambda a: a.model.model.layers[new - 1].state_dict()  # noqa: E731
    block = lambda a: a.model.model.layers[new].state_dict()  # noqa: E731
    for name, t in block(zero).items():  # LLaMA Pro: the block before, with both residual outputs zeroed
        zeroed = name.endswith(("o_proj.weight", "down_proj.weight"))
        assert torch.equal(t, torch.zeros_like(t) if zeroed else before(zero)[name]), name
    assert all(torch.equal(t, before(copied)[n]) for n, t in block(copied).items())
    assert not any(torch.equal(t, before(fresh)[n]) for n, t in block(fresh).items() if "norm" not in n)


def test_expand_branch_embedding_from_the_old_rows_where_tokens_coincide(base):
    root, recipes = base
    old_tok = load_tokenizer(root / "base")
    new_tok = train_bpe(load_corpus(recipes, get_domain("recipes")).documents, 350)
    old_rows = AutoModelForCausalLM.from_pretrained(root / "base").get_input_embeddings().weight
    pairs = shared_tokens(old_tok, new_tok)
    assert 256 < len(pairs) < 350  # the bytes and specials at least, not every merge
    for init in ("random", "shared_tokens"):
        adapted, _ = _branch(base, tokenizer=new_tok, embedding_init=init)
        rows = adapted.model.get_input_embeddings().weight
        same = [torch.equal(rows[n], old_rows[o]) for n, o in pairs]
        assert all(same) if init == "shared_tokens" else not any(same)


def test_expand_branch_path_only_capacity_on_the_copied_old_blocks(base):
    (plain, _), (norms, _), (every, _) = (_branch(base, **o) for o in ({}, {"train_block_norms": True},
                                                                        {"train_every": 2}))
    dim, block = plain.model.config.hidden_size, count_params(plain.model.model.layers[0])
    old = plain.state["old_layers"]
    assert count_params(norms.model, True) - count_params(plain.model, True) == 2 * dim * len(old)
    assert count_params(every.model, True) - count_params(plain.model, True) == block * (len(old) // 2)
    trained = [i for i in old if all(p.requires_grad for p in every.model.model.layers[i].parameters())]
    assert trained == old[1::2]


def test_expand_branch_trunk_trains_when_the_budget_reaches_a_token_per_old_parameter(base):
    root, _ = base
    params = count_params(AutoModelForCausalLM.from_pretrained(root / "base"))
    frozen, trained, unknown = (_branch(base, new_blocks=None, budget=b)[0] for b in (params - 1, params, None))
    assert frozen.state["trunk"] == unknown.state["trunk"] == "frozen" and len(frozen.state["new_layers"]) == 2
    assert not any(p.requires_grad for i in frozen.state["old_layers"]
                   for p in frozen.model.model.layers[i].parameters())
    assert trained.state == {"old_layers": list(range(PRESETS["nano"].layers)), "new_layers": [], "trunk": "trained"}
    assert count_params(trained.model, True) == count_params(trained.model)  # the expert's size, every weight
    def same(a, b):  # the same weights, and the same of them trained
        sa, sb = a.model.state_dict(), b.model.state_dict()
        grads = lambda m: {n: p.requires_grad for n, p in m.named_parameters()}  # noqa: E731
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and grads(a.model) == grads(b.model)
    # what issue 7's curve trained by hand before `trunk` existed (docs/RESULTS.md's rows are these models)
    assert same(trained, _branch(base, new_blocks=0, train_every=1)[0])
    assert same(frozen, _branch(base, new_blocks=2)[0])
    big = 10 * params
    assert _branch(base, new_blocks=None, trunk="frozen", budget=big)[0].state["trunk"] == "frozen"
    assert len(_branch(base, new_blocks=2, trunk="trained", budget=0)[0].state["new_layers"]) == 2
    for frozen_only in ({"lora_r": 4}, {"train_every": 2}, {"train_block_norms": True}):  # these mean a frozen trunk
        assert _branch(base, budget=big, **frozen_only)[0].state["trunk"] == "frozen"
        with pytest.raises(UserError, match="with trunk=trained every copied block trains already"):
            _branch(base, trunk="trained", **frozen_only)


def test_expand_branch_trains_over_the_old_models_own_frozen_tensors_and_copies_what_it_trains(base):
    """Training holds the frozen trunk once: the branch's frozen copied blocks are the old model's tensors;
    what may change (trained blocks or norms, blocks LoRA is merged into) is a copy."""
    root, _ = base
    old_tok = load_tokenizer(root / "base")

    def shared_blocks(**options) -> list[bool]:
        ctx = _context(base, old_tok)
        ctx.tokenizer, ctx.budget_tokens = old_tok, 0
        old = AutoModelForCausalLM.from_pretrained(root / "base")
        adapted = make_method("expand_branch", {"new_blocks": 1, **options}).build(old, ctx)
        branch = adapted.model.get_base_model() if isinstance(adapted.model, PeftModel) else adapted.model
        tensors = lambda block, part: {id(p) for n, p in block.named_parameters() if part in n}  # noqa: E731
        return [(bool(tensors(branch.model.layers[i], "proj") & tensors(old.model.layers[j], "proj")),
                 bool(tensors(branch.model.layers[i], "layernorm") & tensors(old.model.layers[j], "layernorm")))
                for j, i in enumerate(adapted.state["old_layers"])]

    blocks = len(shared_blocks())
    assert shared_blocks() == [(True, True)] * blocks
    assert shared_blocks(train_block_norms=True) == [(True, False)] * blocks
    assert shared_blocks(train_every=2) == [(n % 2 == 1, n % 2 == 1) for n in range(1, blocks + 1)]
    assert shared_blocks(lora_r=2) == shared_blocks(trunk="trained", new_blocks=0) == [(False, False)] * blocks


def test_expand_branch_lora_on_the_path_is_merged_into_the_branch(base):
    root, _ = base
    record, out = _adapt(base, "expand_branch", "branch_lora", options={"new_blocks": 0, "lora_r": 4, "vocab_size": 350})
    base_model = AutoModelForCausalLM.from_pretrained(root / "base")
    branch = load_served(out, device="cpu").export_model("recipes")  # the adapters folded in
    assert not any("lora" in n for n in branch.state_dict())
    moved = [n for n, t in base_model.state_dict().items()
             if n.startswith("model.layers.") and not torch.equal(branch.state_dict()[n], t)]
    assert moved and all(n.endswith("proj.weight") for n in moved)
    served = load_served(out)
    ids = _ids(served.tokenizer_for("stories"))
    assert torch.equal(_logits(served.for_domain("stories"), ids), _logits(base_model, ids))
    assert record["forgetting"] == {"stories": 0.0}
