"""Model: Llama-architecture presets as `transformers.LlamaForCausalLM`, tied embeddings (docs/DESIGN.md,
"Model presets")."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from ..errors import unknown


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
        raise unknown("preset", name, PRESETS) from None


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


def preset_dict(preset: Preset) -> dict:
    return {**asdict(preset), "hidden": preset.hidden}
