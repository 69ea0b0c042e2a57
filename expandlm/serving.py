"""Serving a model folder for a requested domain, whatever strategy made it.

`expandlm.json` beside the checkpoint says how each domain runs: the whole model (most strategies),
a LoRA adapter switched on or off (`adapter`), or a layer path (`paths`, from expand_paths).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .artifacts import read_json
from .domains import get_domain
from .errors import UserError
from .model import set_layers
from .tokenizer import load_tokenizer

MODEL_CARD = "expandlm.json"


@dataclass
class ServedModel:
    model: torch.nn.Module
    tokenizer: object
    card: dict
    path: Path

    @property
    def domains(self) -> list[str]:
        return list(self.card.get("domains", []))

    def for_domain(self, name: str) -> torch.nn.Module:
        """The model configured to answer requests for `name` (adapter / layer path selected)."""
        if self.domains and name not in self.domains:
            raise UserError(f"{self.path} serves {', '.join(self.domains)}, not '{name}'")
        get_domain(name)
        return select_domain(self.model, self.card, name)


def select_domain(model, card: dict, name: str):
    if "adapter" in card:
        (model.enable_adapter_layers if card["adapter"].get(name) else model.disable_adapter_layers)()
    if "paths" in card:
        inner = model.model
        if not hasattr(inner, "_expandlm_all_layers"):
            inner._expandlm_all_layers = list(inner.layers)  # plain list: not registered as submodules
        set_layers(model, [inner._expandlm_all_layers[i] for i in card["paths"][name]])
    return model


def restore_all_layers(model) -> None:
    """Undo a layer-path selection (before saving: the checkpoint holds every block)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "_expandlm_all_layers"):
        set_layers(model, inner._expandlm_all_layers)
        del inner._expandlm_all_layers


def resolve_base(card: dict, path: Path) -> Path:
    base = Path(card["base"])
    return base if base.is_absolute() else (path / base).resolve()


def context_length(path: str | os.PathLike) -> int:
    """The context of a model folder without loading its weights (a LoRA folder: its base's)."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / MODEL_CARD).exists():
        path = resolve_base(read_json(path / MODEL_CARD, "model card"), path)
    return read_json(path / "config.json", "model config")["max_position_embeddings"]


def load_served(path: str | os.PathLike) -> ServedModel:
    path = Path(path)
    card = read_json(path / MODEL_CARD, "model card") if (path / MODEL_CARD).exists() else {}
    if (path / "adapter_config.json").exists():
        from peft import PeftModel
        base = resolve_base(card, path)
        if not (base / "config.json").exists():
            raise UserError(f"{path}: its base model {base} is missing (a LoRA adapter needs its base)")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
    elif (path / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        raise UserError(f"{path}: no config.json; expected a model folder written by expandlm")
    model.eval()
    return ServedModel(model, load_tokenizer(path), card, path)
