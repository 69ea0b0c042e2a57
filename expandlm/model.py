"""Model: Llama-architecture presets (design.md §4) as `transformers.LlamaForCausalLM`, tied embeddings."""
from __future__ import annotations

import copy
import functools
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from .errors import UserError


@dataclass(frozen=True)
class Preset:
    dim: int
    layers: int
    heads: int
    vocab: int  # target vocabulary of the tokenizer trained for this preset
    context: int
    kv_heads: int | None = None  # fewer than `heads` gives grouped-query attention

    @property
    def hidden(self) -> int:
        """llama2.c's SwiGLU width: 2/3 of 4·dim, rounded up to a multiple of 32."""
        h = int(2 * 4 * self.dim / 3)
        return 32 * ((h + 31) // 32)


PRESETS = {
    "nano": Preset(dim=32, layers=2, heads=2, vocab=512, context=128),
    "tiny": Preset(dim=128, layers=6, heads=4, vocab=2048, context=256),
    "small": Preset(dim=288, layers=6, heads=6, vocab=4096, context=256),
    "base": Preset(dim=512, layers=8, heads=8, vocab=8192, context=512),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})") from None


def llama_config(preset: Preset, tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=preset.dim, intermediate_size=preset.hidden,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads or preset.heads, max_position_embeddings=preset.context,
        rms_norm_eps=1e-5, tie_word_embeddings=True, use_cache=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def build_model(preset: Preset, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(preset, tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_length=preset.context)
    return model


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (the tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------------
# One model, several domains: the domain a call runs for, per-domain layer paths, domain views.
#
# The domain of a call is a context variable, not an attribute of the model: it belongs to the
# thread (or asyncio task) making the call, so two requests for two domains of one model at the same
# time never see each other's choice, and nothing about the model changes between requests.

ACTIVE_DOMAIN: ContextVar[str | None] = ContextVar("expandlm_active_domain", default=None)


@contextmanager
def active_domain(name: str | None) -> Iterator[None]:
    token = ACTIVE_DOMAIN.set(name)
    try:
        yield
    finally:
        ACTIVE_DOMAIN.reset(token)


@functools.cache
def _gated_class(block_class: type) -> type:
    """`block_class` with a gate: off the active domain's path it returns its input unchanged (an
    identity block), on the path (or with no domain active, as in training) it runs as usual. A
    subclass rather than a wrapper module, so parameter names, `state_dict`, `.to()` and the KV cache
    indices stay exactly those of the standard model."""
    def forward(self, hidden_states, *args, **kwargs):
        domain = ACTIVE_DOMAIN.get()
        if domain is not None and domain not in self.expandlm_domains:
            return hidden_states
        return block_class.forward(self, hidden_states, *args, **kwargs)
    return type(f"PathGated{block_class.__name__}", (block_class,), {"forward": forward})


def gate_blocks(model, paths: dict[str, list[int]]) -> None:
    """Give every decoder block that is not on every domain's path a gate (`paths`: domain → the
    indices of the blocks it runs)."""
    for i, block in enumerate(model.model.layers):
        on = frozenset(d for d, path in paths.items() if i in path)
        if len(on) < len(paths):
            block.__class__ = _gated_class(type(block))
            block.expandlm_domains = on


def path_model(model, path: list[int]):
    """A standard model that runs exactly the blocks of `path`: a fresh copy with the layers
    renumbered (for export; the served model is left as it is)."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(path)
    if getattr(config, "layer_types", None):  # transformers ties this per-layer list to the layer count
        config.layer_types = [config.layer_types[i] for i in path]
    rename = {f"model.layers.{i}.": f"model.layers.{j}." for j, i in enumerate(path)}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in rename:
                continue
            name = rename[prefix] + name[len(prefix):]
        state[name] = tensor
    out = type(model)(config)
    out.load_state_dict(state, strict=False)  # the tied lm_head is not in a state dict of its own
    out.tie_weights()
    out.generation_config = copy.deepcopy(model.generation_config)
    return out.eval()


class DomainView:
    """A model as one domain sees it: every call runs inside that domain's context (layer paths) and
    with its extra call arguments (a PEFT adapter on or off). The model is shared, never changed."""

    def __init__(self, model, domain: str, call_kwargs=None):
        self.model, self.domain = model, domain
        self._call_kwargs = call_kwargs or (lambda batch_size: {})  # batch size → extra kwargs

    def __call__(self, input_ids=None, **kwargs):
        with active_domain(self.domain):
            return self.model(input_ids=input_ids, **self._call_kwargs(len(input_ids)), **kwargs)

    def generate(self, input_ids=None, **kwargs):
        n = len(input_ids) * kwargs.get("num_return_sequences", 1)
        with active_domain(self.domain):
            return self.model.generate(input_ids=input_ids, **self._call_kwargs(n), **kwargs)

    def __getattr__(self, name):  # config, parameters(), eval(), training, device, ...: the model's
        return getattr(self.model, name)


def context_length(model) -> int:
    return model.config.max_position_embeddings


def preset_dict(preset: Preset) -> dict:
    return {**asdict(preset), "hidden": preset.hidden}
