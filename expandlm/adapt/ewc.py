"""ewc: full fine-tuning on B with an elastic penalty toward the old weights (Kirkpatrick et al. 2017).

penalty = λ/2 · Σ_i F_i (θ_i − θ*_i)², with F the diagonal (empirical) Fisher information estimated on
the old domains' data (each an equal share): the mean squared gradient of the next-token loss. F is
normalised to mean 1 over all parameters so that λ reads the same at every model size.
"""
from typing import Annotated

import torch
from pydantic import Field

from ..config import arg, config
from ..data.shards import PackedBatches
from ..model.window import window
from ..training.fisher import diagonal_fisher
from ..training.loop import causal_lm_loss
from .method import AdaptContext, Adapted, Method


class EWC(Method):
    name = "ewc"
    needs_old_data = True

    @config
    class Options:
        lam: Annotated[float, Field(ge=0)] = arg(1.0, "strength λ of the penalty")
        fisher_batches: Annotated[int, Field(gt=0)] = arg(16, "batches of old-domain data for the Fisher")
        fisher_batch_size: Annotated[int, Field(gt=0)] = arg(8, "sequences per Fisher batch")

    def build(self, base, ctx: AdaptContext):
        shards = list(ctx.old_shards.values())
        # every old domain an equal share of the Fisher's windows (one domain: its windows in epoch order)
        weights = [1 / len(shards)] * len(shards) if len(shards) > 1 else None
        context = window(base.config.max_position_embeddings, ctx.context)
        batches = PackedBatches(shards, context, self.options.fisher_batch_size, seed=ctx.seed + 1, weights=weights)
        fisher = diagonal_fisher(base, [batches.batch(i) for i in range(self.options.fisher_batches)])
        anchor = {n: (p.detach().clone(), fisher[n]) for n, p in base.named_parameters() if n in fisher}
        return Adapted(base, {"anchor": anchor})  # name → (θ*, F)

    def penalty(self, adapted: Adapted, model) -> torch.Tensor:
        total = torch.zeros(())
        for n, p in model.named_parameters():
            anchor = adapted.state["anchor"].get(n.removeprefix("module.").removeprefix("_orig_mod."))
            if anchor is not None:
                theta, f = anchor[0].to(p.device), anchor[1].to(p.device)
                total = total.to(p.device) + (f * (p - theta) ** 2).sum()
        return self.options.lam / 2 * total

    def loss(self, adapted: Adapted, model, batch):
        return causal_lm_loss(model, batch) + self.penalty(adapted, model)
