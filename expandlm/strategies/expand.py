"""expand: LLaMA Pro block expansion (Wu et al. 2024, arXiv 2401.02415).

k new blocks are inserted, each a copy of the block before it with `o_proj` and `down_proj` set to
zero: both residual branches of a new block then add exactly 0, so the expanded model computes
exactly what the old one did. Every old parameter (embeddings, norms, blocks) is frozen; only the new
blocks train.
"""
import copy
from dataclasses import dataclass

import torch

from ..model import set_layers
from . import AdaptContext, Strategy, freeze, register


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
    set_layers(model, layers)
    return old_idx, new_idx


@register
@dataclass
class Expand(Strategy):
    name = "expand"
    summary = "k zero-initialised blocks added, old parameters frozen, only the new blocks trained"
    new_blocks: int = 2
    position: str = "interleave"  # interleave | end

    def __post_init__(self):
        if self.new_blocks < 1 or self.position not in ("interleave", "end"):
            raise ValueError("needs new_blocks >= 1 and position 'interleave' or 'end'")

    def build(self, base, ctx: AdaptContext):
        freeze(base)
        self.old_layers, self.new_layers = expand_blocks(base, self.new_blocks, self.position)
        for i in self.new_layers:
            for p in base.model.layers[i].parameters():
                p.requires_grad = True
        return base

    def card(self, ctx: AdaptContext):
        card = super().card(ctx)
        card["new_layers"] = self.new_layers
        return card
