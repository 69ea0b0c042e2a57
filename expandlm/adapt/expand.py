"""expand: LLaMA Pro block expansion (Wu et al. 2024, arXiv 2401.02415).

k new blocks are inserted, each a copy of the block before it with `o_proj` and `down_proj` (an
architecture's own output projections: `model.blocks.output_projections`) set to zero: both residual
branches of a new block then add exactly 0, so the expanded model computes
exactly what the old one did. Every old parameter (embeddings, norms, blocks) is frozen; only the new
blocks train. Every domain runs every block (see expand_paths for the variant that keeps A exact).
"""
import copy
from typing import Annotated, Literal

import torch
from pydantic import Field

from ..config import arg, config
from ..errors import UserError
from ..model.blocks import NotAnIdentity, decoder_blocks, output_projections, replace_blocks
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


def expand_blocks(model, new_blocks: int, position: str = "interleave",
                  zero: bool = True) -> tuple[list[int], list[int]]:
    """Insert copies of blocks in place, their output projections zeroed (`zero`): the expanded model then
    computes exactly what the old one did, which is checked on a few tokens. Returns (indices of the old
    blocks, of the new blocks) in the expanded model."""
    old_layers = list(decoder_blocks(model)[0])
    after = new_block_positions(len(old_layers), new_blocks, position)
    before = _probe(model) if zero and new_blocks else None
    layers, sources, old_idx, new_idx = [], [], [], []
    for i, layer in enumerate(old_layers):
        old_idx.append(len(layers))
        layers.append(layer)
        sources.append(i)
        for _ in range(after.count(i)):
            block = copy.deepcopy(layer)
            projections = output_projections(model, block) if zero else {}
            with torch.no_grad():
                for projection in projections.values():
                    projection.weight.zero_()
                    if projection.bias is not None:
                        projection.bias.zero_()
            new_idx.append(len(layers))
            layers.append(block)
            sources.append(i)
    replace_blocks(model, layers)
    if getattr(model.config, "layer_types", None):  # a per-layer list (Gemma2's sliding/full): a copy's is its source's
        model.config.layer_types = [model.config.layer_types[i] for i in sources]
    if before is not None and not torch.equal(_probe(model), before):
        raise NotAnIdentity(f"{type(model).__name__}: a new block with {' and '.join(projections)} zeroed still "
                            "changes the model's output (its residual takes more than those), so it cannot start as "
                            "the identity (LLaMA Pro's init)")
    return old_idx, new_idx


def _probe(model) -> torch.Tensor:
    """The model's logits on a few tokens, in eval mode (no dropout)."""
    device = model.get_input_embeddings().weight.device
    ids = torch.arange(1, 9, device=device)[None] % model.config.vocab_size
    training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    model.train(training)
    return logits


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
        except (ValueError, NotAnIdentity) as e:
            raise UserError(f"method '{self.name}': {e}") from None
        layers, _ = decoder_blocks(base)
        for i in new:
            layers[i].requires_grad_(True)
        return Adapted(base, {"old_layers": old, "new_layers": new})

    def card(self, adapted: Adapted, ctx: AdaptContext):
        return {"new_layers": adapted.state["new_layers"]}
