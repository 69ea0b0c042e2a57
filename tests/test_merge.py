"""Merging experts of one common start (expandlm.merge.run): every method, full models and adapters."""
import json
import math

import pytest
import torch
import yaml
from peft.utils import merge_utils
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CODE, RECIPES, write_jsonl
from expandlm.errors import UserError
from expandlm.merge.run import MergeConfig, MergeModel, MergeParameters, check_config, load_merge_config, merge
from expandlm.formats.served import load_served
from test_formats_pretrained import PROMPT, plain_ids, run, save_checkpoint

def state(path):
    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def cfg(method, models, base=None, **parameters):
    return MergeConfig(method=method, models=[MergeModel(model=str(m)) for m in models],
                       base=str(base) if base else None, parameters=MergeParameters(**parameters))


def test_linear_merge_is_the_weighted_average_and_loads_with_transformers(experts, tmp_path):
    a, b = experts["recipes-full_ft"], experts["code-full_ft"]
    config = MergeConfig(method="linear", models=[MergeModel(model=str(a), weight=3.0), MergeModel(model=str(b), weight=1.0)])
    out = merge(config, tmp_path / "linear")
    merged, sa, sb = state(out.path), state(a), state(b)
    for k in merged:
        torch.testing.assert_close(merged[k], 0.75 * sa[k] + 0.25 * sb[k])
    served = load_served(out.path)
    assert served.domains == ["stories", "recipes", "code"]  # every domain its models served
    card = json.loads((out.path / "expandlm.json").read_text())
    assert card["merged"] == {"method": "linear", "experts": ["recipes", "code"]}
    assert set(served.domain_data()) == {"stories", "recipes", "code"}


def test_task_arithmetic_adds_the_weighted_task_vectors_to_the_base(experts, tmp_path):
    base, a, b = experts["base"], experts["recipes-full_ft"], experts["code-full_ft"]
    config = MergeConfig(method="task_arithmetic", base=str(base),
                         models=[MergeModel(model=str(a), weight=0.5), MergeModel(model=str(b), weight=0.7)])
    merged, s0, sa, sb = state(merge(config, tmp_path / "ta").path), state(base), state(a), state(b)
    for k in merged:
        torch.testing.assert_close(merged[k], s0[k] + 0.5 * (sa[k] - s0[k]) + 0.7 * (sb[k] - s0[k]))


def test_ties_keeps_the_top_density_of_each_task_vector_and_elects_signs(experts, tmp_path):
    base, a, b = experts["base"], experts["recipes-full_ft"], experts["code-full_ft"]
    merged = state(merge(cfg("ties", [a, b], base, density=0.2), tmp_path / "ties").path)
    s0, sa, sb = state(base), state(a), state(b)
    key = "model.layers.0.mlp.up_proj.weight"
    deltas = [sa[key] - s0[key], sb[key] - s0[key]]
    expected = s0[key] + merge_utils.ties(deltas, torch.ones(2), 0.2, "total")
    torch.testing.assert_close(merged[key], expected)
    changed = (merged[key] != s0[key]).float().mean().item()
    assert changed <= 0.4 + 1e-6  # at most the union of the two kept 20 %


def test_dare_is_seeded_and_rescales_what_it_keeps(experts, tmp_path):
    base, a, b = experts["base"], experts["recipes-full_ft"], experts["code-full_ft"]
    first = state(merge(cfg("dare_linear", [a, b], base, density=0.5, seed=3), tmp_path / "d1").path)
    again = state(merge(cfg("dare_linear", [a, b], base, density=0.5, seed=3), tmp_path / "d2").path)
    other = state(merge(cfg("dare_linear", [a, b], base, density=0.5, seed=4), tmp_path / "d3").path)
    key = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(first[key], again[key]) and not torch.equal(first[key], other[key])
    s0, sa, sb = state(base), state(a), state(b)
    # each kept delta entry is rescaled by 1/density, so the expected merged delta is the plain sum
    mean_delta = (first[key] - s0[key]).mean()
    plain = ((sa[key] - s0[key]) + (sb[key] - s0[key])).mean()
    assert abs(mean_delta - plain) < 0.5 * (sa[key] - s0[key]).abs().mean() + 1e-6


def test_fisher_merge_weighs_each_parameter_by_each_experts_fisher(experts, tmp_path, monkeypatch):
    from expandlm.merge import run as merge_module

    a, b = experts["recipes-full_ft"], experts["code-full_ft"]
    out = merge(cfg("fisher", [a, b], windows=4), tmp_path / "fisher")
    merged, sa, sb = state(out.path), state(a), state(b)
    key = "model.layers.0.self_attn.v_proj.weight"
    lo, hi = torch.minimum(sa[key], sb[key]), torch.maximum(sa[key], sb[key])
    assert ((merged[key] >= lo - 1e-6) & (merged[key] <= hi + 1e-6)).all()  # a per-entry convex combination
    assert not torch.allclose(merged[key], (sa[key] + sb[key]) / 2)  # and not the plain average
    # with equal Fishers it is the plain average
    monkeypatch.setattr(merge_module, "diagonal_fisher",
                        lambda model, batches, normalize: {n: torch.ones_like(p) for n, p in model.named_parameters()})
    even = state(merge(cfg("fisher", [a, b], windows=2), tmp_path / "even").path)
    torch.testing.assert_close(even[key], (sa[key] + sb[key]) / 2)


def test_regmean_solves_each_linear_layer_from_the_experts_inputs(experts, tmp_path):
    a, b = experts["recipes-full_ft"], experts["code-full_ft"]
    merged = state(merge(cfg("regmean", [a, b], windows=4), tmp_path / "regmean").path)
    sa, sb = state(a), state(b)
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(merged[norm], (sa[norm] + sb[norm]) / 2)  # not a linear layer: the average
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(merged[key], (sa[key] + sb[key]) / 2)
    # alpha 0 keeps only the Gram diagonals: a per-input-feature weighted average, between the two
    diag = state(merge(cfg("regmean", [a, b], windows=4, regmean_alpha=0.0), tmp_path / "diag").path)
    lo, hi = torch.minimum(sa[key], sb[key]), torch.maximum(sa[key], sb[key])
    assert ((diag[key] >= lo - 1e-5) & (diag[key] <= hi + 1e-5)).all()


def test_merging_one_model_with_itself_gives_it_back(experts, tmp_path):
    a = experts["recipes-full_ft"]
    for method in ("fisher", "regmean"):
        merged = state(merge(cfg(method, [a, a], windows=2), tmp_path / method).path)
        for k, v in state(a).items():
            torch.testing.assert_close(merged[k], v, atol=1e-4, rtol=1e-4)


def test_adapters_merge_into_one_peft_adapter(experts, tmp_path):
    from peft import PeftModel

    a, b = experts["recipes-lora"], experts["code-lora"]
    out = merge(cfg("task_arithmetic", [a, b], experts["base"]), tmp_path / "lora-ta")
    assert (out.path / "adapter_config.json").exists() and not (out.path / "config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(experts["base"])
    merged = PeftModel.from_pretrained(base, out.path).merge_and_unload().state_dict()
    # PEFT's `cat` stacks the ranks: exactly the sum of both updates
    ua = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(experts["base"]), a).merge_and_unload().state_dict()
    ub = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(experts["base"]), b).merge_and_unload().state_dict()
    s0 = state(experts["base"])
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], s0[key] + (ua[key] - s0[key]) + (ub[key] - s0[key]), atol=1e-5, rtol=1e-4)
    served = load_served(out.path)
    assert served.domains == ["stories", "recipes", "code"]
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(served.for_domain("stories")(input_ids=ids).logits,
                               served.for_domain("code")(input_ids=ids).logits)  # one merged model for all


def test_adapters_with_a_data_method_become_a_full_checkpoint(experts, tmp_path):
    out = merge(cfg("fisher", [experts["recipes-lora"], experts["code-lora"]], windows=2), tmp_path / "lora-fisher")
    assert (out.path / "config.json").exists()
    AutoModelForCausalLM.from_pretrained(out.path)


def test_config_errors_name_the_problem(experts, tmp_path):
    a, b = str(experts["recipes-full_ft"]), str(experts["code-full_ft"])
    with pytest.raises(UserError, match="needs 'base'"):
        check_config(cfg("ties", [a, b]), "m.yaml")
    with pytest.raises(UserError, match="at least 2"):
        check_config(cfg("linear", [a]), "m.yaml")
    with pytest.raises(UserError, match="not a model folder"):
        check_config(cfg("linear", [a, tmp_path / "missing"]), "m.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"method": "slerp", "models": [{"model": a}, {"model": b}]}))
    with pytest.raises(UserError, match="bad.yaml.*method"):
        load_merge_config(path)
    path.write_text(yaml.safe_dump({"method": "ties", "models": [{"model": a}, {"model": b}], "base": str(experts["base"]),
                                    "parameters": {"density": 1.5}}))
    with pytest.raises(UserError, match="density"):
        load_merge_config(path)
    # each method reads its own parameters: one it does not read is refused, not ignored
    path.write_text(yaml.safe_dump({"method": "linear", "models": [{"model": a}, {"model": b}],
                                    "parameters": {"density": 0.5, "seed": 3}}))
    with pytest.raises(UserError, match=r"bad.yaml: parameters: method 'linear' does not read 'density' \(its "
                                        r"parameters: normalize, seed\)"):
        load_merge_config(path)
    path.write_text(yaml.safe_dump({"method": "linear", "models": [{"model": a}, {"model": b}],
                                    "parameters": {"normalize": False, "seed": 3}}))
    assert load_merge_config(path).parameters.normalize is False


def test_models_of_another_tokenizer_or_shape_are_refused(experts, tmp_path, two_domain_models):
    import shutil

    from expandlm.data.tokenizer import load_tokenizer
    from expandlm.data.vocab import with_tag

    a = experts["recipes-full_ft"]
    other = shutil.copytree(experts["code-full_ft"], tmp_path / "other-tokenizer")
    with_tag(load_tokenizer(other), "<|extra|>").save_pretrained(other)
    with pytest.raises(UserError, match="different tokenizer"):
        merge(cfg("linear", [a, other]), tmp_path / "tok")
    with pytest.raises(UserError, match="different weights|export a domain"):
        merge(cfg("linear", [a, two_domain_models["expand_branch"]]), tmp_path / "branch")
    with pytest.raises(UserError, match="different bases"):  # the same tokenizer, another stories expert
        merge(cfg("task_arithmetic", [experts["recipes-lora"], two_domain_models["lora"]], experts["base"]), tmp_path / "b")
    with pytest.raises(UserError, match="adapters with adapters"):
        merge(cfg("task_arithmetic", [a, experts["code-lora"]], experts["base"]), tmp_path / "mixed")
    out = merge(cfg("linear", [a, experts["code-full_ft"]]), tmp_path / "once")
    with pytest.raises(UserError, match="already holds a run"):
        merge(cfg("linear", [a, experts["code-full_ft"]]), out.path)


def test_merge_command_reads_a_mergekit_style_yaml(experts, tmp_path):
    from expandlm.cli import main

    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({"method": "dare_ties", "base": str(experts["base"]), "parameters": {"density": 0.7},
                                    "models": [{"model": str(experts["recipes-full_ft"]), "weight": 0.6},
                                               {"model": str(experts["code-full_ft"]), "weight": 0.6}]}))
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["kind"] == "merge" and record["spec"]["parameters"]["density"] == 0.7 and "versions" in record


def test_arrow_keeps_the_adapters_and_routes_each_token_among_them(experts, tmp_path):
    from peft import PeftModel

    from expandlm.inference.generate import SamplingConfig, generate
    from expandlm.domains import get_domain

    a, b = experts["recipes-lora"], experts["code-lora"]
    out = merge(cfg("arrow", [a, b], top_k=1), tmp_path / "arrow")
    assert sorted(p.name for p in (out.path / "experts").iterdir()) == ["0-recipes", "1-code"]
    served = load_served(out.path)
    assert served.card.format == "arrow" and served.domains == ["stories", "recipes", "code"]
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    base = AutoModelForCausalLM.from_pretrained(experts["base"]).eval()
    with torch.no_grad():
        routed = served.for_domain("recipes")(input_ids=ids).logits
        assert not torch.allclose(routed, base(input_ids=ids).logits)
    # two copies of one adapter: whatever the routing picks, the output is that adapter's
    twice = load_served(merge(cfg("arrow", [a, a], top_k=2), tmp_path / "twice").path)
    alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(experts["base"]), a).eval()
    with torch.no_grad():
        torch.testing.assert_close(twice.model(input_ids=ids).logits, alone(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    drawn = generate(served.for_domain("code"), served.tokenizer_for("code"), get_domain("code"), "", 1,
                     SamplingConfig(temperature=0, max_new_tokens=5))  # the lean engine hands it to transformers
    assert drawn[0].text is not None
    with pytest.raises(UserError, match="no one set of weights"):
        served.export_model("code")
    with pytest.raises(UserError, match="full models"):
        merge(cfg("arrow", [a, experts["code-full_ft"]]), tmp_path / "mixed")


# -- models grown from one checkpoint that transformers saved (no expandlm.json) ----------------------------
# lora makes each new domain plain, like the checkpoint's own `base`; full_ft appends its domain's tag at the
# checkpoint's next id, so two full fine-tunes have different tags at one id.

GROW = ["--limit", "20", "--max-steps", "2", "--batch-size", "2", "--eval-interval", "0", "--no-progress"]
ADAPTER_METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The checkpoint ("ckpt", a tiny random Llama with grouped-query attention and an untied head) and the
    folders grown from it: "recipes-lora", "code-lora", "recipes-full_ft", "code-full_ft"; and "data"."""
    from expandlm.cli import main

    root = tmp_path_factory.mktemp("pretrained")
    save_checkpoint(root / "ckpt", "llama")
    data = {"recipes": write_jsonl(root / "recipes.jsonl", RECIPES),
            "code": write_jsonl(root / "code.jsonl", [{"text": t} for t in CODE])}
    made = {"ckpt": root / "ckpt", "data": data}
    for strategy in ("lora", "full_ft"):
        for domain in ("recipes", "code"):
            made[f"{domain}-{strategy}"] = root / f"{domain}-{strategy}"
            assert main(["adapt", "--base", str(root / "ckpt"), "--domain", domain, "--data", str(data[domain]),
                         "--strategy", strategy, "--out", str(made[f"{domain}-{strategy}"]), *GROW]) == 0
    return made


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def _config(tmp_path, method, models, base=None, **parameters):
    path = tmp_path / f"{method}.yaml"
    body = {"method": method, "models": [{"model": str(m)} for m in models], "parameters": parameters}
    path.write_text(yaml.safe_dump({**body, "base": str(base)} if base else body))
    return path


@pytest.mark.parametrize("method", ADAPTER_METHODS + ["arrow"])
def test_lora_adapters_of_a_pretrained_checkpoint_merge_and_its_own_domain_stays_exact(pretrained, method,
                                                                                       capsys, tmp_path):
    ckpt = pretrained["ckpt"]
    models = [pretrained["recipes-lora"], pretrained["code-lora"]]
    base = ckpt if method in ("task_arithmetic", "ties", "dare_linear", "dare_ties") else None
    code, _, err = run(capsys, "merge", _config(tmp_path, method, models, base), "--out", tmp_path / "out")
    assert code == 0, err
    card = json.loads((tmp_path / "out" / "expandlm.json").read_text())
    assert card["domains"] == card["plain"] == ["base", "recipes", "code"]  # lora's domains are plain
    assert card["adapter"] == {"base": False, "recipes": True, "code": True}
    served = load_served(tmp_path / "out", device="cpu")
    ids = plain_ids(AutoTokenizer.from_pretrained(ckpt), PROMPT)
    original = _logits(AutoModelForCausalLM.from_pretrained(ckpt).eval(), ids)
    assert torch.equal(_logits(served.for_domain("base"), ids), original)  # the adapter off: the checkpoint
    assert not torch.allclose(_logits(served.for_domain("recipes"), ids), original)


def test_generate_and_eval_run_on_merged_adapters_of_a_pretrained_checkpoint(pretrained, capsys, tmp_path):
    models = [pretrained["recipes-lora"], pretrained["code-lora"]]
    path = _config(tmp_path, "ties", models, pretrained["ckpt"])
    code, _, err = run(capsys, "merge", path, "--out", tmp_path / "out")
    assert code == 0, err
    code, text, err = run(capsys, "generate", "--model", tmp_path / "out", "--domain", "code", "--prompt", "def",
                          "--temperature", "0", "--max-new-tokens", "6", "--json")
    assert code == 0, err
    assert json.loads(text)["samples"][0]["text"].startswith("def")
    bpb = {}
    for folder in (tmp_path / "out", pretrained["ckpt"]):
        code, text, err = run(capsys, "eval", "--model", folder, "--domain", "base", "--data",
                              pretrained["data"]["code"], "--out", tmp_path / f"{folder.name}.json")
        assert code == 0, err
        bpb[folder.name] = json.loads(text)["bpb"]
    assert bpb["out"] == bpb["ckpt"]  # the merged folder's base domain is the checkpoint, to the last bit


def test_full_fine_tunes_with_different_tags_at_one_id_merge_over_the_checkpoint(pretrained, capsys, tmp_path):
    ckpt, a, b = pretrained["ckpt"], pretrained["recipes-full_ft"], pretrained["code-full_ft"]
    tags = [AutoTokenizer.from_pretrained(f).convert_ids_to_tokens(320) for f in (a, b)]
    assert tags == ["<|recipes|>", "<|code|>"]  # each appended its own tag at the checkpoint's next id
    path = tmp_path / "ta.yaml"
    path.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(ckpt),
                                    "models": [{"model": str(a), "weight": 0.5}, {"model": str(b), "weight": 0.7}]}))
    code, _, err = run(capsys, "merge", path, "--out", tmp_path / "out")
    assert code == 0, err
    card = json.loads((tmp_path / "out" / "expandlm.json").read_text())
    assert card["domains"] == ["base", "recipes", "code"] and card["plain"] == ["base"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_ids_to_tokens([320, 321]) == ["<|recipes|>", "<|code|>"]
    merged, s0, sa, sb = state(tmp_path / "out"), state(ckpt), state(a), state(b)
    key = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(merged[key], s0[key] + 0.5 * (sa[key] - s0[key]) + 0.7 * (sb[key] - s0[key]))
    emb, e0, ea, eb = (s["model.embed_tokens.weight"] for s in (merged, s0, sa, sb))
    # a tag a model never had starts, in it, where adapt starts a tag: the mean of its rows
    start, b_start = e0.mean(dim=0), eb.mean(dim=0)
    torch.testing.assert_close(emb[320], start + 0.5 * (ea[320] - start) + 0.7 * (b_start - start))
    torch.testing.assert_close(emb[321], start + 0.5 * (ea.mean(dim=0) - start) + 0.7 * (eb[320] - start))
    for domain, prompt in (("recipes", "Banana"), ("code", "def"), ("base", PROMPT)):
        code, text, err = run(capsys, "generate", "--model", tmp_path / "out", "--domain", domain, "--prompt", prompt,
                              "--temperature", "0", "--max-new-tokens", "4", "--json")
        assert code == 0, err
        assert json.loads(text)["samples"][0]["text"].startswith(prompt)


def test_a_fine_tune_merges_with_its_own_pretrained_checkpoint(pretrained, capsys, tmp_path):
    ckpt, a = pretrained["ckpt"], pretrained["recipes-full_ft"]
    code, _, err = run(capsys, "merge", _config(tmp_path, "linear", [ckpt, a]), "--out", tmp_path / "out")
    assert code == 0, err
    card = json.loads((tmp_path / "out" / "expandlm.json").read_text())
    assert card["domains"] == ["base", "recipes"] and card["plain"] == ["base"]
    merged, s0, sa = state(tmp_path / "out"), state(ckpt), state(a)
    key = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(merged[key], (s0[key] + sa[key]) / 2)
    code, text, err = run(capsys, "eval", "--model", tmp_path / "out", "--domain", "recipes", "--data",
                          pretrained["data"]["recipes"], "--out", tmp_path / "eval.json")
    assert code == 0, err
    assert math.isfinite(json.loads(text)["bpb"])


def test_a_card_less_checkpoint_is_named_as_the_models_grown_from_it_name_it(pretrained, capsys, tmp_path):
    ckpt = pretrained["ckpt"]
    code, _, err = run(capsys, "adapt", "--base", ckpt, "--base-domain", "general", "--domain", "recipes", "--data",
                       pretrained["data"]["recipes"], "--strategy", "full_ft", "--out", tmp_path / "general", *GROW)
    assert code == 0, err
    code, _, err = run(capsys, "merge", _config(tmp_path, "linear", [tmp_path / "general", ckpt]), "--out",
                       tmp_path / "out")
    assert code == 0, err
    card = json.loads((tmp_path / "out" / "expandlm.json").read_text())
    assert card["domains"] == ["general", "recipes"] and card["plain"] == ["general"]  # not a second domain `base`


def test_what_cannot_merge_from_a_pretrained_checkpoint_is_one_line_naming_the_file_and_entry(pretrained, capsys,
                                                                                              tmp_path):
    ckpt, loras = pretrained["ckpt"], [pretrained["recipes-lora"], pretrained["code-lora"]]
    code, _, err = run(capsys, "export", pretrained["recipes-lora"], "--domain", "recipes", "--out", tmp_path / "plain")
    assert code == 0, err
    cases = [  # (config, what the line says after the file, and why)
        (_config(tmp_path, "fisher", [ckpt, pretrained["recipes-full_ft"]]), "models[0]: ",
         "no record of its 'base' training data"),
        (_config(tmp_path, "ties", loras, ckpt, svd_rank=30), "parameters: svd_rank 30 is above 16",
         "model.layers.0.self_attn.k_proj"),
        (_config(tmp_path, "dare_ties", loras, tmp_path / "nowhere"), "base: ", "no such model folder"),
        (_config(tmp_path, "linear", [tmp_path / "plain", pretrained["recipes-full_ft"]]), "models[0] ",
         "request 'recipes' with no tag and models[1] with its tag <|recipes|>"),
    ]
    for path, entry, why in cases:
        code, _, err = run(capsys, "merge", path, "--out", tmp_path / "never")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"expandlm: error: {path}: {entry}") and why in err, err
