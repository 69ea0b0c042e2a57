"""A folder format: how a model folder is stored and served, whatever training made it.

    save(model, folder, card, start) → card  write the trained model (`start`: the model training began
                                             from, for formats that store only what differs from it)
    load(folder, card, open_base) → model    the saved model, ready to serve (`open_base` opens the folder it
                                             is built on, as a served model, for formats that need one)
    serve(model, card, domain)               the model as `domain` sees it (a view: the shared model never changes)
    export(model, card, domain)              one standard transformers model computing exactly what `serve` does
    tokenizer_folder(folder, card, domain, of_base)   where `domain`'s tokenizer is saved

and declares `one_set_of_weights` (its weights serve every domain, so a training method may continue
them), `serves_old_from_base` (the folder holds only its new domains; `base` serves the rest) and
`exportable` (one set of weights computes each domain). The defaults are the plain checkpoint's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..errors import UserError
from ..records import ModelCard
from .gguf_input import cached, dequantized_folder, gguf_file

BASE_GGUF_SHA256 = "base_gguf_sha256"  # a card's reference to a GGUF base by its content (`gguf_input`)


class Format:
    name: ClassVar[str]
    one_set_of_weights: ClassVar[bool] = True
    serves_old_from_base: ClassVar[bool] = False
    exportable: ClassVar[bool] = True

    def save(self, model: torch.nn.Module, folder, card: ModelCard, start: torch.nn.Module | None = None) -> ModelCard:
        folder.save(model.save_pretrained)
        return card

    def load(self, folder, card: ModelCard, open_base: Callable) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM
        if not (folder / "config.json").exists():
            raise UserError(f"{folder.path}: no config.json; expected a model folder (written by expandlm, or any "
                            "checkpoint transformers saved)")
        return AutoModelForCausalLM.from_pretrained(folder.path)

    def serve(self, model, card: ModelCard, domain: str):
        return model

    def export(self, model, card: ModelCard, domain: str) -> torch.nn.Module:
        return model

    def tokenizer_folder(self, folder, card: ModelCard, domain: str, of_base: Callable) -> Path:
        return folder.path

    def base_folder(self, folder, card: ModelCard) -> Path:
        """The folder this one is built on (formats with a base), checked to exist."""
        if not card.base:
            raise UserError(f"{folder.path / 'expandlm.json'}: field 'base' is missing (a folder of this format is "
                            "built on a base folder)")
        base = folder.path / card.base
        sha = card.details.get(BASE_GGUF_SHA256)
        if gguf_file(base) is not None:  # a GGUF base: its dequantized folder
            return dequantized_folder(base)
        if (base / "config.json").exists() or (base / "expandlm.json").exists():
            return base
        if sha is not None and cached(sha) is not None:  # a GGUF base moved away: found by its content
            return cached(sha)
        raise UserError(f"{folder.path}: its base model {base.resolve()} is missing (it is built on it"
                        + (f"; a GGUF file of sha256 {sha}" if sha else "") + ")")

