"""expand_branch: the new domain gets a branch of its own over the old model's frozen blocks.

The branch is the new domain's own byte-level BPE tokenizer, its own embedding (tied to its output
head), its own final norm and k new zero-initialised blocks (LLaMA Pro's), around every old block,
shared and frozen. Nothing of the old model changes, so old domains are served by the old model
itself: bit for bit the old expert. It follows the paper's first finding (a domain's own tokenizer
matters) per path: the old blocks are a good engine for the new domain once its text comes in through
its own tokenizer and embedding, and the new blocks add capacity on the new path only.

The folder holds the new domain's model as a standard checkpoint with its tokenizer (what
`AutoModelForCausalLM` / `AutoTokenizer` load from it); the old domains are served from `base`.
"""
import copy
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field
from transformers import AutoModelForCausalLM

from ..config import arg, config
from ..errors import UserError
from ..tokenizer import train_bpe
from . import Adapted, AdaptContext, Strategy, freeze, register
from .expand import expand_blocks


class BranchModels(torch.nn.Module):
    """The model of each domain (a module, so `.to()` and `.eval()` reach all of them)."""

    def __init__(self, models: dict[str, torch.nn.Module]):
        super().__init__()
        self.models = torch.nn.ModuleDict(models)


@register
class ExpandBranch(Strategy):
    name = "expand_branch"
    summary = "B's own tokenizer, embedding/head, final norm and k new blocks over A's frozen blocks"
    supports_vocab_expansion = False  # B has a whole vocabulary of its own
    keeps_old_domains = True
    adaptable_again = False
    own_tokenizer = True

    @config
    class Options:
        new_blocks: Annotated[int, Field(ge=0)] = arg(2, "new blocks on the new domain's path (0: none)")
        position: Literal["interleave", "end"] = arg("interleave", "spread the new blocks evenly, or all at the end")
        vocab_size: Annotated[int, Field(gt=0)] | None = arg(None, "the new tokenizer's size (default: the old one's)")
        train_norm: bool = arg(True, "train the branch's own final norm (false: keep the old one, frozen)")

    def new_tokenizer(self, documents: list[str], old_tokenizer):
        return train_bpe(documents, self.options.vocab_size or len(old_tokenizer))

    def build(self, base, ctx: AdaptContext):
        model = copy.deepcopy(base)  # the old model stays as it is: it serves the old domains
        freeze(model)
        old, new = list(range(model.config.num_hidden_layers)), []
        if self.options.new_blocks:
            try:
                old, new = expand_blocks(model, self.options.new_blocks, self.options.position)
            except ValueError as e:
                raise UserError(f"strategy '{self.name}': {e}") from None
        for i in new:
            model.model.layers[i].requires_grad_(True)
        tok = ctx.tokenizer
        model.resize_token_embeddings(len(tok), mean_resizing=False)  # re-ties the head, sets vocab_size
        embedding = model.get_input_embeddings().weight
        with torch.no_grad():  # a fresh embedding for a new vocabulary: the init of a new model
            embedding.normal_(0.0, model.config.initializer_range,
                              generator=torch.Generator().manual_seed(ctx.seed))
        embedding.requires_grad_(True)
        model.model.norm.requires_grad_(self.options.train_norm)
        for cfg in (model.config, model.generation_config):
            cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        return Adapted(model, {"old_layers": old, "new_layers": new})

    def card(self, adapted: Adapted, ctx: AdaptContext):
        return {"new_layers": adapted.state["new_layers"], "own_domains": [ctx.new_domain.name]}

    def _base(self, folder, card) -> Path:
        base = folder.path / card["base"]
        if not (base / "config.json").exists():
            raise UserError(f"{folder.path}: its base model {base.resolve()} is missing (the old domains run on it)")
        return base

    def load(self, folder, card):
        new = AutoModelForCausalLM.from_pretrained(folder.path)
        old = AutoModelForCausalLM.from_pretrained(self._base(folder, card))
        return BranchModels({d: new if d in card["own_domains"] else old for d in card["domains"]})

    def serve(self, model, card, domain):
        return model.models[domain]

    def export(self, model, card, domain):
        return model.models[domain]

    def tokenizer_folder(self, folder, card, domain):
        return folder.path if domain in card["own_domains"] else self._base(folder, card)
