"""A causal LM's decoder blocks, found through the model's own structure, whatever transformers architecture it
is: `get_decoder()` and its list of blocks (Llama's `model.layers`, GPT-2's `transformer.h`, GPT-NeoX's
`gpt_neox.layers`), the norms in and after them, their linear layers and the projections that write into the
residual stream. What a method needs of a block and an architecture lacks is refused in one line naming the
model class."""
from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from ..errors import UserError


class NotAnIdentity(UserError):
    """A new block of this architecture cannot start as the identity by zeroing its output projections."""


def decoder_blocks(model) -> tuple[torch.nn.ModuleList, str]:
    """The decoder blocks of `model` (a causal LM, a PEFT model over one, or one of empty weights) and the
    prefix of their names in it: block i's parameters are `f"{prefix}{i}.…"` (e.g. "model.layers.",
    "transformer.h.", "gpt_neox.layers."; "base_model.model.model.layers." for a PEFT model)."""
    count = model.config.num_hidden_layers
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    lists = [m for m in (decoder.children() if isinstance(decoder, torch.nn.Module) else ())
             if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if not lists:
        raise UserError(f"{_name(model)}: no list of its {count} decoder blocks in its decoder "
                        f"({type(decoder).__name__}); expandlm finds them as `get_decoder()`'s block list")
    name = next(n for n, m in model.named_modules() if m is lists[0])
    return lists[0], f"{name}."


def replace_blocks(model, blocks: list[torch.nn.Module]) -> None:
    """Put `blocks` in place of the model's decoder blocks (the config's layer count follows)."""
    _, prefix = decoder_blocks(model)
    parent, _, attribute = prefix[:-1].rpartition(".")
    setattr(model.get_submodule(parent), attribute, torch.nn.ModuleList(blocks))
    model.config.num_hidden_layers = len(blocks)
    for i, block in enumerate(blocks):  # the KV cache (and some scalings) go by a block's index in the stack
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = i


def final_norm(model) -> torch.nn.Module:
    """The norm after the last block (Llama's `norm`, GPT-2's `ln_f`, GPT-NeoX's `final_layer_norm`)."""
    decoder = model.get_decoder()
    norms = [m for m in decoder.children() if is_norm(m)]
    if not norms:
        raise UserError(f"{_name(model)}: no final norm among its decoder's modules ({type(decoder).__name__})")
    return norms[-1]


def is_norm(module: torch.nn.Module) -> bool:
    """A LayerNorm or RMSNorm, by transformers' own rule (architectures name their norm classes)."""
    name = type(module).__name__
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "LayerNorm" in name or "RMSNorm" in name


def block_norms(block: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The norms inside a block by name (Llama's input/post-attention ones, GPT-2's ln_1 and ln_2, OLMo2's
    post-norms, Qwen3's q/k norms)."""
    return {n: m for n, m in block.named_modules() if is_norm(m)}


def is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, Conv1D))


def out_features(module: torch.nn.Module) -> int:
    return module.nf if isinstance(module, Conv1D) else module.out_features


def block_linear_names(model) -> list[str]:
    """The names (the last part) of every linear layer in the decoder blocks, as PEFT targets them: Llama's
    q/k/v/o and gate/up/down projections, GPT-2's c_attn, c_proj and c_fc."""
    blocks, _ = decoder_blocks(model)
    return sorted({n.rpartition(".")[2] for n, m in blocks.named_modules() if is_linear(m)})


def output_projections(model, block: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers by which a block writes into the residual stream: in each of its parts that holds linear
    layers (attention, MLP), the last one back to the hidden size (Llama's o_proj and down_proj, GPT-2's
    c_proj, GPT-NeoX's dense and dense_4h_to_h). With them zero the block adds nothing, in architectures
    whose residual takes nothing else (`expand.expand_blocks` checks that it does not)."""
    hidden = model.config.hidden_size
    found = {}
    for part, module in block.named_children():
        if is_norm(module) or not any(True for _ in module.parameters()):
            continue
        to_hidden = [(n, m) for n, m in module.named_modules() if is_linear(m) and out_features(m) == hidden]
        if not to_hidden:
            raise NotAnIdentity(f"{_name(model)}: its blocks' {part} ({type(module).__name__}) has no linear layer "
                                f"back to the hidden size ({hidden}) to zero, so a new block cannot start as the "
                                "identity (LLaMA Pro's init)")
        name, projection = to_hidden[-1]
        found[f"{part}.{name}" if name else part] = projection
    return found


def _name(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__
