"""Adaptation strategies: how one model comes to serve a new domain after the old ones (design.md §5).

A strategy is one file with one class, registered by name with `@register`. It owns everything that
is particular to it, from adapting to serving:

    Options                       its options: a validated config dataclass (CLI `--option k=v`, YAML)
    build(base, ctx) → Adapted    the model to train (add, freeze, re-create parameters) and any state
                                  the training needs (kept on `Adapted`, never on the strategy)
    mixture(ctx)                  the training data, as (token shard, weight) pairs
    loss(adapted, model, batch)   the training loss
    card(adapted, ctx)            what `expandlm.json` must record to serve each domain later
    save(model, folder)           how the trained model is written
    load(folder, card)            the saved model, ready to serve
    serve(model, card, domain)    the model as `domain` sees it (a view: the shared model never changes)
    export(model, card, domain)   a standard checkpoint computing exactly what `serve` computes

and declares what it can do: `supports_vocab_expansion`, `keeps_old_domains` (old domains' outputs
stay bit-identical), `adaptable_again` (its saved model is one set of weights that a further strategy
may continue), `serves_old_from_base` (the new domain is built from one old domain's model and the old
domains stay served by the base folder itself, so it adapts any model, whatever strategy made it),
`own_tokenizer` (the new domain gets its own tokenizer: `ctx.tokenizer` is then the new domain's). Each hook
has a default for a strategy whose single set of weights serves every domain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..config import build, config
from ..domains import Domain
from ..errors import UserError
from ..run_folder import MODEL_CARD, RunFolder
from ..shards import TokenShard
from ..train import causal_lm_loss


@dataclass
class AdaptContext:
    """What every strategy may use: the old domains and their data, the new domain and its data."""
    old_domains: list[str]
    new_domain: Domain
    new_shard: TokenShard
    old_shards: dict[str, TokenShard]
    tokenizer: object             # the new domain's text's
    old_tokenizer: object         # the old domains' text's (the same one unless the strategy is own_tokenizer)
    base_vocab: int               # the old tokenizer's size (rows below it are the old embedding rows)
    preset: str
    seed: int = 0
    budget_tokens: int | None = None  # the tokens training will see, when known before it starts (not under --minutes)

    @property
    def domains(self) -> list[str]:
        return [*self.old_domains, self.new_domain.name]


@dataclass
class Adapted:
    """The model a strategy trains, and what it computed while building it (EWC's anchor, the
    indices of new blocks): the trained state, kept apart from the strategy's options."""
    model: torch.nn.Module
    state: dict = field(default_factory=dict)


@config
class NoOptions:
    pass


class Strategy:
    name: ClassVar[str] = "scratch"   # the card of an expert trained from scratch names this base class
    summary: ClassVar[str] = "one set of weights, trained from scratch"
    Options: ClassVar[type] = NoOptions
    supports_vocab_expansion: ClassVar[bool] = True
    keeps_old_domains: ClassVar[bool] = False
    adaptable_again: ClassVar[bool] = True
    serves_old_from_base: ClassVar[bool] = False
    own_tokenizer: ClassVar[bool] = False   # the new domain gets a tokenizer of its own (adapt trains it)

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()

    # -- adapting ---------------------------------------------------------------------------------
    def build(self, base: torch.nn.Module, ctx: AdaptContext) -> Adapted:
        return Adapted(base)

    def mixture(self, ctx: AdaptContext) -> list[tuple[TokenShard, float]]:
        return [(ctx.new_shard, 1.0)]

    def loss(self, adapted: Adapted, model, batch: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(model, batch)

    def card(self, adapted: Adapted, ctx: AdaptContext) -> dict:
        return {}

    def save(self, model, folder: RunFolder) -> None:
        folder.save(model.save_pretrained)

    # -- serving ----------------------------------------------------------------------------------
    def load(self, folder: RunFolder, card: dict):
        from transformers import AutoModelForCausalLM
        if not (folder / "config.json").exists():
            raise UserError(f"{folder.path}: no config.json; expected a model folder written by expandlm")
        return AutoModelForCausalLM.from_pretrained(folder.path)

    def serve(self, model, card: dict, domain: str):
        return model

    def export(self, model, card: dict, domain: str):
        return model

    def tokenizer_folder(self, folder: RunFolder, card: dict, domain: str) -> Path:
        """Where `domain`'s tokenizer is saved (one tokenizer for every domain, unless a strategy gives
        a domain its own)."""
        return folder.path


def mix(ctx: AdaptContext, new_share: float) -> list[tuple[TokenShard, float]]:
    """The new domain's data at `new_share` of the windows, the old domains' sharing the rest."""
    old = [(shard, (1 - new_share) / len(ctx.old_shards)) for shard in ctx.old_shards.values()]
    return [(ctx.new_shard, new_share), *old]


def freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad = False


STRATEGIES: dict[str, type[Strategy]] = {}
DEFAULT_STRATEGY = "expand_branch"  # the measured winner of issue 7 (docs/RESULTS.md): `adapt`'s default


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def strategy_class(name: str) -> type[Strategy]:
    if name == Strategy.name:
        return Strategy
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy '{name}' (known: {', '.join(STRATEGIES)})")
    return STRATEGIES[name]


def make_strategy(name: str, options: dict | None = None, where: str | None = None) -> Strategy:
    """A strategy by name with its options validated (an unknown option or a bad value names the option
    and what was expected)."""
    cls = strategy_class(name)
    return cls(build(cls.Options, options or {}, where or f"strategy '{name}' options"))


def strategy_of(card: dict) -> Strategy:
    """The strategy that serves a saved model, from its card (a card-less folder: one set of weights)."""
    return make_strategy(card.get("strategy", Strategy.name), card.get("options") or {},
                         f"{MODEL_CARD}: options")

# The strategies, one file each; importing them registers them.
from . import arrow, ewc, expand, expand_branch, expand_paths, full_ft, joint, lora, replay  # noqa: E402,F401

__all__ = ["AdaptContext", "Adapted", "Strategy", "STRATEGIES", "DEFAULT_STRATEGY", "register", "make_strategy", "strategy_of",
           "freeze", "mix"]
