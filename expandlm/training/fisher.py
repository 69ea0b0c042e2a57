"""The diagonal (empirical) Fisher information of a model on some text: the mean squared gradient of the
next-token loss per parameter. EWC weighs its penalty with it (`adapt/ewc.py`) and Fisher merging weighs
each model's parameters by it (`merge`).

    fisher = diagonal_fisher(model, [batch_1, batch_2])   # {parameter name: tensor of its shape}
"""
from __future__ import annotations

import torch

from .loop import causal_lm_loss


def diagonal_fisher(model, batches: list[torch.Tensor], normalize: bool = True) -> dict[str, torch.Tensor]:
    """The mean squared gradient of the next-token loss over `batches` (normalised: mean 1)."""
    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model, batch).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2 / len(batches)
    model.zero_grad(set_to_none=True)
    if not normalize:
        return fisher
    mean = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp_min(1e-30)
    return {n: f / mean for n, f in fisher.items()}
