"""joint: one model trained on the old and new domains mixed, from scratch or continued from the base."""
from typing import Annotated

import torch
from pydantic import Field

from ..config import arg, config
from ..model.llama import build_model, get_preset
from .method import AdaptContext, Adapted, Method, mix


class Joint(Method):
    name = "joint"
    needs_old_data = True

    @config
    class Options:
        from_scratch: bool = arg(True, "fresh weights (the paper's combined model); false: continue A's model")
        new_share: Annotated[float, Field(gt=0, le=1)] = arg(0.5, "share of training windows from the new domain")

    def build(self, base, ctx: AdaptContext):
        if not self.options.from_scratch:
            return Adapted(base)
        # Same architecture and tokenizer as the base, fresh weights: the "combined model" of the paper. A
        # checkpoint expandlm did not train has no preset: its own config (Qwen2, Mistral, ...) is the architecture.
        if ctx.preset is None:
            torch.manual_seed(ctx.seed)
            return Adapted(type(base)(base.config))
        return Adapted(build_model(get_preset(ctx.preset), ctx.tokenizer, seed=ctx.seed))

    def mixture(self, ctx: AdaptContext):
        return mix(ctx, self.options.new_share)
