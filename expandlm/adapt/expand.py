"""expand: LLaMA Pro block expansion (Wu et al. 2024, arXiv 2401.02415).

k new blocks are inserted, each a copy of the block before it with `o_proj` and `down_proj` set to
zero: both residual branches of a new block then add exactly 0, so the expanded model computes
exactly what the old one did. Every old parameter (embeddings, norms, blocks) is frozen; only the new
blocks train. Every domain runs every block (see expand_paths for the variant that keeps A exact).
"""
import copy
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..config import arg, config
from .method import AdaptContext, Adapted, Method, freeze


def new_block_positions(num_layers: int, new_blocks: int, position: str) -> list[int]:
    """Indices (in the old model) of the blocks after which a new block is inserted: spread evenly
    (LLaMA Pro: one after each group of num_layers/k blocks), or all at the end."""
    if position == "end":
        return [num_layers - 1] * new_blocks
    if new_blocks > num_layers:
        raise ValueError(f"new_blocks ({new_blocks}) > layers ({num_layers}) with position 'interleave'")
    group = num_layers / new_blocks
    return [round(group * (i + 1)) - 1 for i in range(new_blocks)]


def expand_blocks(model, new_blocks: int, position: str = "interleave") -> tuple[list[int], list[int]]:
    """Insert zero-initialised copies in place. Returns (indices of the old blocks, of the new blocks)
    in the expanded model."""
    old_layers = list(model.model.layers)
    after = new_block_positions(len(old_layers), new_blocks, position)
    layers, old_idx, new_idx = [], [], []
    for i, layer in enumerate(old_layers):
        old_idx.append(len(layers))
        layers.append(layer)
        for _ in range(after.count(i)):
            block = copy.deepcopy(layer)
            with torch.no_grad():
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
            new_idx.append(len(layers))
            layers.append(block)
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i  # the KV cache is indexed by position in the stack
    model.model.layers = torch.nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):  # a per-layer list tied to the layer count
        model.config.layer_types = [model.config.layer_types[0]] * len(layers)
    return old_idx, new_idx


class Expand(Method):
    name = "expand"

    @config
    class Options:
        new_blocks: Annotated[int, Field(ge=1)] = arg(2, "number of new blocks")
        position: Literal["interleave", "end"] = arg("interleave", "spread the new blocks evenly, or all at the end")

    def build(self, base, ctx: AdaptContext):
        freeze(base)
        try:
            old, new = expand_blocks(base, self.options.new_blocks, self.options.position)
        except ValueError as e:
            from ..errors import UserError
            raise UserError(f"strategy '{self.name}': {e}") from None
        for i in new:
            for p in base.model.layers[i].parameters():
                p.requires_grad = True
        return Adapted(base, {"old_layers": old, "new_layers": new})

    def card(self, adapted: Adapted, ctx: AdaptContext):
        return {"new_layers": adapted.state["new_layers"]}
