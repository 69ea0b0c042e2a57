"""Adaptation strategies: how one model comes to serve a new domain B after the old ones (design.md §5).

A strategy is one small module with one class implementing this interface; registering it with
`@register` makes it selectable by name in `expandlm adapt` and `expandlm compare`. Each hook has a
default, so a strategy overrides only what makes it different:

- `build(base, ctx)`: the model to train, from the old expert (add parameters, freeze parameters);
- `mixture(ctx)`: the training data, as (token shard, weight) pairs;
- `loss(model, batch)`: the training loss (default: next-token cross entropy);
- `card(ctx)`: how the saved model serves each domain (adapter on/off, layer path), for `serving.py`;
- `save(model, out)`: how the trained model is written (default: a standard HF checkpoint).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..domains import Domain
from ..errors import UserError
from ..shards import TokenShard
from ..train import causal_lm_loss


@dataclass
class AdaptContext:
    """What every strategy may use: the old expert, the old and new domains' data, the tokenizer."""
    base_dir: Path
    old_domains: list[str]
    new_domain: Domain
    new_shard: TokenShard
    old_shards: dict[str, TokenShard]
    tokenizer: object
    base_vocab: int               # the old tokenizer's size (rows below it are the old embedding rows)
    preset: str
    seed: int = 0

    @property
    def domains(self) -> list[str]:
        return [*self.old_domains, self.new_domain.name]


@dataclass
class Strategy:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def build(self, base: torch.nn.Module, ctx: AdaptContext) -> torch.nn.Module:
        return base

    def mixture(self, ctx: AdaptContext) -> list[tuple[TokenShard, float]]:
        return [(ctx.new_shard, 1.0)]

    def loss(self, model, batch: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(model, batch)

    def card(self, ctx: AdaptContext) -> dict:
        """`expandlm.json` for the adapted model: every domain runs the whole model."""
        return {"domains": ctx.domains, "strategy": self.name, "options": dataclasses.asdict(self),
                "base": str(ctx.base_dir), "preset": ctx.preset}

    def save(self, model, out: Path) -> None:
        model.save_pretrained(out)


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(name: str, options: dict | None = None) -> Strategy:
    """A strategy by name, its options checked against its fields (unknown or mistyped → UserError)."""
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy '{name}' (known: {', '.join(STRATEGIES)})")
    cls = STRATEGIES[name]
    known = {f.name: f for f in dataclasses.fields(cls)}
    options = dict(options or {})
    for key, value in options.items():
        if key not in known:
            raise UserError(f"strategy '{name}': unknown option '{key}' "
                            f"(known: {', '.join(known) or 'none'})")
        expected = type(known[key].default) if known[key].default is not dataclasses.MISSING else None
        if expected in (int, float) and isinstance(value, str):
            try:
                options[key] = expected(value)
            except ValueError:
                raise UserError(f"strategy '{name}': option '{key}' must be {expected.__name__}, got {value!r}") from None
        elif expected is bool and isinstance(value, str):
            options[key] = value.lower() in ("1", "true", "yes")
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise UserError(f"strategy '{name}': {e}") from None


def freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad = False


# The strategies, one module each; importing them registers them.
from . import expand, expand_paths, ewc, full_ft, joint, lora, replay  # noqa: E402,F401

__all__ = ["AdaptContext", "Strategy", "STRATEGIES", "register", "make_strategy", "freeze"]
