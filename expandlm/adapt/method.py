"""A training method: how a trained model comes to serve a new domain (docs/DESIGN.md, "Methods and formats").

A method is one file with one class, listed in `adapt/__init__.py`. It owns how the model learns the
new domain; how the result is stored and served is its folder format's (`formats/`), named by `format`:

    Options                       its options: a validated config dataclass (CLI `--option k=v`, YAML)
    build(base, ctx) → Adapted    the model to train (add, freeze, re-create parameters) and any state
                                  the training needs (kept on `Adapted`, never on the method)
    mixture(ctx)                  the training data, as (token shard, weight) pairs
    loss(adapted, model, batch)   the training loss
    card(adapted, ctx)            what its format must find in `expandlm.json` to serve each domain

and declares what it can do: `supports_vocab_expansion`, `keeps_old_domains` (old domains' outputs
stay bit-identical), `needs_old_data` (it trains on the old domains' data, so it grows a checkpoint whose
data is unknown only from `--base-data`), `own_tokenizer` (the new domain gets its own tokenizer:
`ctx.tokenizer` is then the new domain's). Each hook has a default for a method that trains one set of
weights on the new domain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..config import config
from ..domains import Domain
from ..data.shards import TokenShard
from ..training.loop import causal_lm_loss


@dataclass
class AdaptContext:
    """What every method may use: the old domains and their data, the new domain and its data."""
    old_domains: list[str]
    new_domain: Domain
    new_shard: TokenShard
    old_shards: dict[str, TokenShard]
    tokenizer: object             # the new domain's text's
    old_tokenizer: object         # the old domains' text's (the same one unless the method is own_tokenizer)
    base_vocab: int               # the old tokenizer's size (rows below it are the old embedding rows)
    preset: str | None            # None: a checkpoint that expandlm did not train (its own architecture)
    seed: int = 0
    context: int | None = None    # tokens per training window: `--context` (None: `model.window`'s default)
    budget_tokens: int | None = None  # the tokens training will see, when known before it starts (not under --minutes)

    @property
    def domains(self) -> list[str]:
        return [*self.old_domains, self.new_domain.name]


@dataclass
class Adapted:
    """The model a method trains, and what it computed while building it (EWC's anchor, the
    indices of new blocks): the trained state, kept apart from the method's options."""
    model: torch.nn.Module
    state: dict = field(default_factory=dict)


@config
class NoOptions:
    pass


class Method:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    format: ClassVar[str] = "checkpoint"  # the folder format it produces (`formats/`)
    supports_vocab_expansion: ClassVar[bool] = True
    keeps_old_domains: ClassVar[bool] = False
    needs_old_data: ClassVar[bool] = False  # its mixture or loss reads `ctx.old_shards`
    own_tokenizer: ClassVar[bool] = False   # the new domain gets a tokenizer of its own (adapt trains it)

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    def build(self, base: torch.nn.Module, ctx: AdaptContext) -> Adapted:
        return Adapted(base)

    def mixture(self, ctx: AdaptContext) -> list[tuple[TokenShard, float]]:
        return [(ctx.new_shard, 1.0)]

    def loss(self, adapted: Adapted, model, batch: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(model, batch)

    def card(self, adapted: Adapted, ctx: AdaptContext) -> dict:
        return {}


def mix(ctx: AdaptContext, new_share: float) -> list[tuple[TokenShard, float]]:
    """The new domain's data at `new_share` of the windows, the old domains' sharing the rest."""
    old = [(shard, (1 - new_share) / len(ctx.old_shards)) for shard in ctx.old_shards.values()]
    return [(ctx.new_shard, new_share), *old]


def freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad = False
