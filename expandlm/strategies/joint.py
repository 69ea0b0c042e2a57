"""joint: one model trained on the old and new domains mixed, from scratch or continued from the base."""
from dataclasses import dataclass

from ..model import build_model, get_preset
from . import AdaptContext, Strategy, register


@register
@dataclass
class Joint(Strategy):
    name = "joint"
    summary = "every parameter, on A and B mixed"
    from_scratch: bool = True
    new_share: float = 0.5  # share of training windows from the new domain

    def build(self, base, ctx: AdaptContext):
        if not self.from_scratch:
            return base
        # Same architecture and tokenizer as the base, fresh weights: the "combined model" of the paper.
        return build_model(get_preset(ctx.preset), ctx.tokenizer, seed=ctx.seed)

    def mixture(self, ctx: AdaptContext):
        old = [(shard, (1 - self.new_share) / len(ctx.old_shards)) for shard in ctx.old_shards.values()]
        return [(ctx.new_shard, self.new_share), *old]
