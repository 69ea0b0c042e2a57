"""expand_branch: the new domain gets a branch of its own over the old model's frozen blocks.

The branch is the new domain's own byte-level BPE tokenizer, its own embedding (tied to its output
head), its own final norm and k new zero-initialised blocks (LLaMA Pro's), around every old block,
shared and frozen. Nothing of the old model changes, so old domains are served by the old model
itself: bit for bit the old expert. It follows the paper's first finding (a domain's own tokenizer
matters) per path: the old blocks are a good engine for the new domain once its text comes in through
its own tokenizer and embedding, and the new blocks add capacity on the new path only. Over a
pretrained checkpoint the branch keeps the checkpoint's tokenizer, with the domain's tag appended, as
measured better there (`tokenizer_choice`); `tokenizer=own|base` says which.

Stored in the `branch` format: the folder holds the new domain's tokenizer, config and the tensors its
branch trained (the copied trunk tensors it still shares are taken from the base, in memory too;
`export` writes the branch whole); the old domains are served from `base`, loaded as the model folder
it is (in its own format), so a base may be any model.
The branch is built from the model of the base's first domain (`adapt` exports it): the trunk the
chain grew from, trained the longest, so every branch is the trunk plus k blocks, whatever its order.

Because the branch is a copy of the old model, any other capacity given to it stays on the new path:
the options add LoRA adapters on the copied old blocks (merged into the branch when saved), train
the copied blocks' norms, or train a copy of every k-th old block (LLaMA Pro's own control). How much
of the branch trains is `trunk`: `frozen` (only the new blocks, embedding and norm), `trained` (the
branch's copy of every old block too: the expert's size; the old model stays untouched), or `auto`,
which picks by the budget (docs/RESULTS.md measures each option and both trunks).
"""
import copy
from typing import Annotated, Literal

import torch
from pydantic import Field
from peft import LoraConfig, PeftModel, get_peft_model

from ..config import arg, config
from ..errors import UserError
from ..process import log
from ..model.blocks import NotAnIdentity, block_linear_names, block_norms, decoder_blocks, final_norm
from ..model.llama import count_params
from ..data.tokenizer import train_bpe
from ..data.vocab import with_tag
from .method import AdaptContext, Adapted, Method, freeze
from .expand import expand_blocks


PRETRAINED_BASE_TOKENIZER = "base"  # auto's choice over a pretrained checkpoint, measured (`tokenizer_choice`)


def shared_tokens(old_tokenizer, new_tokenizer) -> list[tuple[int, int]]:
    """(new id, old id) of every token whose string is in both vocabularies (bytes, specials, shared merges)."""
    old = old_tokenizer.get_vocab()
    return [(i, old[t]) for t, i in new_tokenizer.get_vocab().items() if t in old]


class ExpandBranch(Method):
    name = "expand_branch"
    format = "branch"
    supports_vocab_expansion = False  # B has a whole vocabulary of its own
    keeps_old_domains = True
    own_tokenizer = True

    @config
    class Options:
        trunk: Literal["auto", "frozen", "trained"] = arg(
            "auto", "the branch's copy of the old blocks: frozen (new blocks add the capacity; a fraction of the "
            "parameters trained), trained from the old weights (the expert's size; better on a large budget), or "
            "auto: trained when the training budget has at least one token per parameter of the old model")
        new_blocks: Annotated[int, Field(ge=0)] | None = arg(
            None, "new blocks on the new domain's path (default: 2 over a frozen trunk, none over a trained one)")
        position: Literal["interleave", "end"] = arg("interleave", "spread the new blocks evenly, or all at the end")
        tokenizer: Literal["auto", "own", "base"] = arg(
            "auto", "the new domain's tokenizer: own (a byte-level BPE trained on its data), base (the base model's "
            "with the domain's tag appended: every other embedding row starts as the base's), or auto: own over a "
            "model expandlm trained, base over a pretrained checkpoint (measured on SmolLM2-135M: docs/RESULTS.md, "
            "\"A real pretrained model\")")
        vocab_size: Annotated[int, Field(gt=0)] | None = arg(
            None, "an own tokenizer's size (default: the old one's)")
        train_norm: bool = arg(True, "train the branch's own final norm (false: keep the old one, frozen)")
        init: Literal["zero", "copy", "random"] = arg(
            "zero", "new blocks: a copy of the block before with its output projections (o_proj/down_proj) zeroed "
            "(LLaMA Pro: the branch starts as the old blocks exactly), a plain copy, or a fresh random block")
        embedding_init: Literal["shared_tokens", "random"] = arg(
            "shared_tokens", "the new embedding: the old rows copied where a token's string is in both vocabularies "
            "(the rest fresh), or all fresh")
        train_block_norms: bool = arg(False, "train the norms of the branch's copy of the old blocks")
        lora_r: Annotated[int, Field(ge=0)] = arg(0, "LoRA rank on the branch's copy of the old blocks (0: none)")
        train_every: Annotated[int, Field(ge=0)] = arg(
            0, "train the branch's copy of every k-th old block (LLaMA Pro's control; 0: none)")

    def new_tokenizer(self, documents: list[str], old_tokenizer, domain, old_domain):
        """The new domain's tokenizer (`tokenizer`): its own BPE, or the old one with its tag appended.
        `old_domain` is the domain of the model the branch grows from (plain: a pretrained checkpoint's)."""
        if self.tokenizer_choice(old_domain) == "base":
            return with_tag(old_tokenizer, domain.tag)
        return train_bpe(documents, self.options.vocab_size or len(old_tokenizer), [domain.tag])

    def tokenizer_choice(self, old_domain) -> str:
        """`tokenizer` resolved. auto: own over expandlm's experts (the paper's finding 2), and over a
        pretrained checkpoint (a plain first domain) the checkpoint's own, with the domain's tag: on
        SmolLM2-135M the own BPE ended above the checkpoint's untouched bpb on the new domain, while its
        own vocabulary, every row trained, went well below it (benchmarks/real_model.py, docs/RESULTS.md,
        "A real pretrained model"). An explicit `vocab_size` asks for an own tokenizer."""
        o = self.options
        if o.tokenizer == "base" and o.vocab_size is not None:
            raise UserError(f"method '{self.name}': vocab_size sizes an own tokenizer, and tokenizer=base keeps "
                            "the base's (drop vocab_size, or use tokenizer=own)")
        if o.tokenizer != "auto":
            return o.tokenizer
        choice = PRETRAINED_BASE_TOKENIZER if old_domain.plain and o.vocab_size is None else "own"
        log(f"tokenizer {choice}: the base model's first domain, {old_domain.name}, is "
            + ("a pretrained checkpoint's own" if old_domain.plain else "one expandlm trained"))
        return choice

    def trunk(self, base, ctx: AdaptContext) -> str:
        """`trunk` resolved. Issue 7's curve (docs/RESULTS.md, tiny): the trained trunk is better at every
        budget, but by 0.4 and 4 points at 0.5M and 1M tokens, where the frozen one trains 45% of the
        parameters and beats the scratch expert by 10-17%; from 2M the difference grows to 7-13 points and
        the frozen trunk falls behind the scratch expert by 4M. auto switches at one token per old
        parameter (between the 1M and 2M points: 0.68 and 1.36). Options that only mean something over a
        frozen trunk keep it frozen."""
        o = self.options
        frozen_only = {"train_every": o.train_every, "lora_r": o.lora_r, "train_block_norms": o.train_block_norms}
        if o.trunk == "trained" and any(frozen_only.values()):
            named = ", ".join(k for k, v in frozen_only.items() if v)
            raise UserError(f"method '{self.name}': {named} train part of a frozen trunk; with trunk=trained every "
                            "copied block trains already (drop them, or use trunk=frozen)")
        if o.trunk != "auto":
            return o.trunk
        if any(frozen_only.values()):
            return "frozen"
        params = count_params(base)
        if ctx.budget_tokens is None:
            log("trunk frozen: a minutes budget does not say its tokens in advance (trunk=trained trains it)")
            return "frozen"
        trunk = "trained" if ctx.budget_tokens >= params else "frozen"
        log(f"trunk {trunk}: {ctx.budget_tokens:,} training tokens {'≥' if trunk == 'trained' else '<'} "
            f"the old model's {params:,} parameters")
        return trunk

    def build(self, base, ctx: AdaptContext):
        trunk = self.trunk(base, ctx)
        new_blocks = self.options.new_blocks if self.options.new_blocks is not None else (2 if trunk == "frozen" else 0)
        model = self._branch_copy(base, trunk)  # the old model stays as it is: it serves the old domains
        freeze(model)
        old, new = list(range(model.config.num_hidden_layers)), []
        if new_blocks:
            try:
                old, new = expand_blocks(model, new_blocks, self.options.position, zero=self.options.init == "zero")
            except NotAnIdentity as e:
                raise UserError(f"method '{self.name}': {e}; start them with --option init=copy or init=random, "
                                "or grow no blocks with --option new_blocks=0") from None
            except ValueError as e:
                raise UserError(f"method '{self.name}': {e}") from None
        generator = torch.Generator().manual_seed(ctx.seed)
        layers, _ = decoder_blocks(model)
        for i in new:
            if self.options.init == "copy":  # the old block it was copied from, weights as they were
                layers[i].load_state_dict(layers[max(o for o in old if o < i)].state_dict())
            elif self.options.init == "random":
                self._fresh_block(model, layers[i], generator)
        self._new_vocabulary(model, ctx, generator)
        tok = ctx.tokenizer
        for cfg in (model.config, model.generation_config):
            cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        if self.options.lora_r:  # PEFT freezes everything but the adapters: unfreeze the rest below
            config = LoraConfig(r=self.options.lora_r, lora_alpha=2 * self.options.lora_r,
                                target_modules=block_linear_names(model), layers_to_transform=old,
                                layers_pattern=decoder_blocks(model)[1].rstrip(".").rpartition(".")[2])
            model = get_peft_model(model, config)
        trained = model.get_base_model() if isinstance(model, PeftModel) else model
        layers, _ = decoder_blocks(trained)
        for i in new:
            layers[i].requires_grad_(True)
        every = 1 if trunk == "trained" else self.options.train_every
        for n, i in enumerate(old, 1):
            if every and n % every == 0:
                layers[i].requires_grad_(True)
            if self.options.train_block_norms:
                for norm in block_norms(layers[i]).values():
                    norm.requires_grad_(True)
        trained.get_input_embeddings().weight.requires_grad_(True)
        trained.get_output_embeddings().weight.requires_grad_(True)  # the same tensor, or an untied head
        final_norm(trained).requires_grad_(self.options.train_norm)
        return Adapted(model, {"old_layers": old, "new_layers": new, "trunk": trunk})

    def _branch_copy(self, base, trunk: str):
        """A copy of the old model to grow the branch from, whose copied blocks keep the old model's own
        tensors where they stay frozen (training then holds the trunk once, as serving does); what the
        branch may change is copied: every block over a trained trunk, or with LoRA (merged into the
        blocks in place when saved), the blocks `train_every` trains, the norms `train_block_norms` trains."""
        o = self.options
        if trunk == "trained" or o.lora_r:
            return copy.deepcopy(base)
        layers, _ = decoder_blocks(base)
        frozen = [block for n, block in enumerate(layers, 1) if not (o.train_every and n % o.train_every == 0)]
        trained_norms = {id(p) for block in frozen for norm in block_norms(block).values() for p in norm.parameters()}
        shared = {id(p): p for block in frozen for p in block.parameters()
                  if not (o.train_block_norms and id(p) in trained_norms)}
        return copy.deepcopy(base, memo=shared)

    def _new_vocabulary(self, model, ctx: AdaptContext, generator) -> None:
        """The embedding (and an untied head: a pretrained model's may be) for the new tokenizer: fresh, the
        init of a new model, with the old rows copied where a token's string is in both (`shared_tokens`) and
        the old embedding has its row (a checkpoint's tokenizer may have more tokens than its embedding rows)."""
        old = [m.weight.detach().clone() for m in self._vocabulary_matrices(model)]
        model.resize_token_embeddings(len(ctx.tokenizer), mean_resizing=False)  # re-ties a tied head, sets vocab_size
        copied = self.options.embedding_init == "shared_tokens"
        shared = [(new_id, old_id) for new_id, old_id in shared_tokens(ctx.old_tokenizer, ctx.tokenizer)
                  if old_id < len(old[0])] if copied else []
        with torch.no_grad():
            for matrix, old_rows in zip(self._vocabulary_matrices(model), old):
                matrix.weight.normal_(0.0, model.config.initializer_range, generator=generator)
                for new_id, old_id in shared:
                    matrix.weight[new_id] = old_rows[old_id]

    @staticmethod
    def _vocabulary_matrices(model) -> list[torch.nn.Module]:
        """The input embedding, and the output head when it is not tied to it."""
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        return [embedding] if head is None or head.weight is embedding.weight else [embedding, head]

    @staticmethod
    def _fresh_block(model, block, generator):
        """The init of a fresh model: normal(0, initializer_range) weights, zero biases, and the norms as the
        architecture starts them (its own `_init_weights`: unit weights, or zeros under Gemma's 1 + weight)."""
        norms = block_norms(block)
        in_norms = {id(p) for norm in norms.values() for p in norm.parameters()}
        with torch.no_grad():
            for p in block.parameters():
                if id(p) not in in_norms:
                    p.normal_(0.0, model.config.initializer_range, generator=generator) if p.dim() > 1 else p.zero_()
        for norm in norms.values():
            for p in norm.parameters():
                p._is_hf_initialized = False  # transformers' init skips a tensor it marked as loaded
            model._init_weights(norm)

    def card(self, adapted: Adapted, ctx: AdaptContext):
        kept = ctx.tokenizer.get_vocab().items() >= ctx.old_tokenizer.get_vocab().items()  # read again on resume
        return {"new_layers": adapted.state["new_layers"], "trunk": adapted.state["trunk"],
                "tokenizer": "base" if kept else "own", "own_domains": [ctx.new_domain.name]}
