"""The fast decode engine: the tokens of transformers' `generate`, for every kind of model serving hands
out, batched or alone, and seeded sampling."""
import pytest
import torch
from transformers import GenerationConfig

from expandlm.domains import get_domain
from expandlm.inference.engine import DecodeEngine, Sampler, run_batch
from expandlm.errors import UserError
from expandlm.inference.generate import SamplingConfig, generate, request_ids
from expandlm.model.llama import PRESETS, build_model
from expandlm.formats.served import load_served
from expandlm.data.tokenizer import bytes_tokenizer

tok = bytes_tokenizer()
GREEDY = SamplingConfig(temperature=0, max_new_tokens=60)


def decisive(preset: str, seed: int = 0, tokenizer=tok):
    """A random model whose logits are far apart (scaled weights), so that greedy decoding is decided
    by the model and not by rounding: two correct implementations must agree on every token."""
    model = build_model(PRESETS[preset], tokenizer, seed=seed).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def hf_tokens(model, ids, n):
    """transformers' greedy tokens, `<|eos|>` an ordinary token (never suppressed, never a stop), as the
    engine computes them."""
    config = GenerationConfig(do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id)
    saved, model.generation_config = model.generation_config, config  # generate() would add the model's eos
    try:
        out = model.generate(input_ids=torch.tensor([ids], device=model.device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device))
    finally:
        model.generation_config = saved
    assert out.shape[1] == len(ids) + n
    return out[0, len(ids):].tolist()


def engine_tokens(engine, ids, n, slot=0):
    logits = engine.prefill(slot, ids)
    tokens = [int(logits.argmax())]
    while len(tokens) < n:
        tokens.append(int(engine.decode([slot], tokens[-1:])[0].argmax()))
    return tokens


@pytest.mark.parametrize("kernel", [True, False], ids=["C step", "torch loop"])
@pytest.mark.parametrize("preset", ["nano", "tiny"])
def test_greedy_tokens_equal_transformers_generate(preset, kernel, device):
    if kernel and device.type != "cpu":
        pytest.skip("the C step is the CPU's")
    model = decisive(preset).to(device)
    ids = request_ids(tok, get_domain("stories"), "Once upon")
    n = model.config.max_position_embeddings - len(ids)  # to the end of the context
    engine = DecodeEngine(model, kernel=kernel)
    assert engine.uses_kernel == kernel  # the C step builds here (a C compiler is part of the test set-up)
    assert engine_tokens(engine, ids, n) == hf_tokens(model, ids, n)


def test_the_transformers_engine_gives_generates_tokens_without_deprecated_arguments(device):
    """`serve --engine hf`: the model's own forward with transformers' cache, passed as this transformers
    names it (`past_key_values` warns that 5.40 removes it)."""
    import warnings

    from expandlm.inference.engine import TransformersEngine

    model = decisive("nano").to(device)
    ids = request_ids(tok, get_domain("stories"), "Once upon")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        tokens = engine_tokens(TransformersEngine(model), ids, 20)
    assert tokens == hf_tokens(model, ids, 20)


def test_grouped_query_attention():
    import dataclasses
    model = build_model(dataclasses.replace(PRESETS["nano"], heads=4, kv_heads=2), tok, seed=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8) if p.dim() == 2 else None
    ids = request_ids(tok, get_domain("stories"), "Hi")
    assert engine_tokens(DecodeEngine(model), ids, 50) == hf_tokens(model, ids, 50)


@pytest.mark.parametrize("strategy", ["expand_paths", "expand_branch", "lora"])
def test_every_domain_view_decodes_as_generate(two_domain_models, strategy):
    served = load_served(two_domain_models[strategy])
    for domain in served.domains:
        view, dtok = served.for_domain(domain), served.tokenizer_for(domain)
        hf = generate(view, dtok, get_domain(domain), "The", sampling=GREEDY, engine="hf")
        for engine in ("fast", "torch"):
            assert generate(view, dtok, get_domain(domain), "The", sampling=GREEDY, engine=engine) == hf


@pytest.mark.parametrize("kernel", [True, False], ids=["C step", "torch loop"])
def test_sequences_of_different_lengths_batched_get_their_tokens_alone(kernel):
    model = decisive("nano", seed=3)
    texts = ("Once upon a time", "Hi", "The dog ran", "A", "Tom and Lily went to the park")
    prompts = [request_ids(tok, get_domain("stories"), p) for p in texts]  # 5: a block of 4 rows and one more
    alone = [engine_tokens(DecodeEngine(model, kernel=kernel), ids, 30) for ids in prompts]
    engine = DecodeEngine(model, slots=len(prompts), kernel=kernel)
    out = [[int(engine.prefill(0, prompts[0]).argmax())]]
    for _ in range(5):  # the first sequence runs alone a while, then the others join it
        out[0].append(int(engine.decode([0], out[0][-1:])[0].argmax()))
    for slot in range(1, len(prompts)):
        out.append([int(engine.prefill(slot, prompts[slot]).argmax())])
    while any(len(t) < 30 for t in out):
        slots = [s for s in range(len(prompts)) if len(out[s]) < 30]
        logits = engine.decode(slots, [out[s][-1] for s in slots])
        for i, s in enumerate(slots):
            out[s].append(int(logits[i].argmax()))
    assert out == alone


def test_seeded_sampling():
    model = decisive("nano")
    ids = request_ids(tok, get_domain("stories"), "A")

    def sample(**kw):
        return [t for step in run_batch(DecodeEngine(model), ids, [Sampler(**kw)], 40, None) for _, t in step]

    assert sample(temperature=1.0, seed=5) == sample(temperature=1.0, seed=5)
    assert sample(temperature=1.0, seed=5) != sample(temperature=1.0, seed=6)
    assert sample(temperature=1.0, top_k=1, seed=5) == sample(temperature=0)  # top-1 is greedy
    assert sample(temperature=1.0, top_p=1e-6, seed=9) == sample(temperature=0)  # so is the smallest nucleus


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    drawn = {Sampler(temperature=5.0, top_k=2, seed=s)(logits) for s in range(200)}
    assert drawn == {0, 1}
    probs = logits.softmax(-1)  # 0.64, 0.24, 0.09, ...: the smallest set with 0.85 of the mass is {0, 1}
    assert probs[:2].sum() > 0.85 > probs[0]
    assert {Sampler(temperature=1.0, top_p=0.85, seed=s)(logits) for s in range(200)} == {0, 1}


def test_a_prompt_that_fills_the_context_is_refused():
    engine = DecodeEngine(decisive("nano"))
    with pytest.raises(UserError, match="context is 128"):
        engine.prefill(0, [0] * 128)
