"""replay: full fine-tuning on B mixed with a fraction of the old domains' data."""
from dataclasses import dataclass

from . import AdaptContext, Strategy, register


@register
@dataclass
class Replay(Strategy):
    name = "replay"
    summary = "every parameter, on B plus a share of A"
    fraction: float = 0.2  # share of training windows drawn from the old domains

    def __post_init__(self):
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be between 0 and 1, got {self.fraction}")

    def mixture(self, ctx: AdaptContext):
        old = [(shard, self.fraction / len(ctx.old_shards)) for shard in ctx.old_shards.values()]
        return [(ctx.new_shard, 1 - self.fraction), *old]
