"""One model, several domains: the domain a call runs for, per-domain block paths, domain views.

The domain of a call is a context variable, not an attribute of the model: it belongs to the thread
(or asyncio task) making the call, so two requests for two domains of one model at the same time never
see each other's choice, and nothing about the model changes between requests.
"""
from __future__ import annotations

import copy
import functools
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from .blocks import decoder_blocks

ACTIVE_DOMAIN: ContextVar[str | None] = ContextVar("expandlm_active_domain", default=None)


@contextmanager
def active_domain(name: str | None) -> Iterator[None]:
    token = ACTIVE_DOMAIN.set(name)
    try:
        yield
    finally:
        ACTIVE_DOMAIN.reset(token)


@functools.cache
def _gated_class(block_class: type) -> type:
    """`block_class` with a gate: off the active domain's path it returns its input unchanged (an
    identity block), on the path (or with no domain active, as in training) it runs as usual. A
    subclass rather than a wrapper module, so parameter names, `state_dict`, `.to()` and the KV cache
    indices stay exactly those of the standard model."""
    def forward(self, hidden_states, *args, **kwargs):
        domain = ACTIVE_DOMAIN.get()
        if domain is not None and domain not in self.expandlm_domains:
            return hidden_states
        return block_class.forward(self, hidden_states, *args, **kwargs)
    return type(f"PathGated{block_class.__name__}", (block_class,), {"forward": forward})


def gate_blocks(model, paths: dict[str, list[int]]) -> None:
    """Give every decoder block that is not on every domain's path a gate (`paths`: domain → the
    indices of the blocks it runs)."""
    for i, block in enumerate(decoder_blocks(model)[0]):
        on = frozenset(d for d, path in paths.items() if i in path)
        if len(on) < len(paths):
            block.__class__ = _gated_class(type(block))
            block.expandlm_domains = on


def path_model(model, path: list[int]):
    """A standard model that runs exactly the blocks of `path`: a fresh copy with the layers
    renumbered (for export; the served model is left as it is)."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(path)
    if getattr(config, "layer_types", None):  # transformers ties this per-layer list to the layer count
        config.layer_types = [config.layer_types[i] for i in path]
    _, blocks = decoder_blocks(model)  # the blocks' name prefix: "model.layers.", GPT-2's "transformer.h."
    rename = {f"{blocks}{i}.": f"{blocks}{j}." for j, i in enumerate(path)}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(blocks):
            prefix = blocks + name[len(blocks):].split(".")[0] + "."
            if prefix not in rename:
                continue
            name = rename[prefix] + name[len(prefix):]
        state[name] = tensor
    out = type(model)(config)
    out.load_state_dict(state, strict=False)  # the tied lm_head is not in a state dict of its own
    out.tie_weights()
    out.generation_config = copy.deepcopy(model.generation_config)
    return out.eval()


class DomainView:
    """A model as one domain sees it: every call runs inside that domain's context (layer paths) and
    with its extra call arguments (a PEFT adapter on or off). The model is shared, never changed."""

    def __init__(self, model, domain: str, call_kwargs=None):
        self.model, self.domain = model, domain
        self._call_kwargs = call_kwargs or (lambda batch_size: {})  # batch size → extra kwargs

    def __call__(self, input_ids=None, **kwargs):
        with active_domain(self.domain):
            return self.model(input_ids=input_ids, **self._call_kwargs(len(input_ids)), **kwargs)

    def generate(self, input_ids=None, **kwargs):
        n = len(input_ids) * kwargs.get("num_return_sequences", 1)
        with active_domain(self.domain):
            return self.model.generate(input_ids=input_ids, **self._call_kwargs(n), **kwargs)

    def __getattr__(self, name):  # config, parameters(), eval(), training, device, ...: the model's
        return getattr(self.model, name)
