"""Vocabulary expansion: grow a trained tokenizer and its model for a new domain (docs/DESIGN.md,
"Methods and formats").

The old tokenizer's tokens, ids and merges are kept exactly; tokens learned from the new domain are
appended (ids len(old)...) with their merges after every old merge, and the tied embedding grows one row
per new token. Old rows stay frozen (bit for bit); only the new rows are trained.
"""
from __future__ import annotations

import copy
import json
from collections import Counter
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..errors import UserError
from .tokenizer import encode_texts, special_tokens, wrap

# marks a partly frozen tensor (`train_only_new_rows`): the optimizer gives it no weight decay, which would
# move its frozen rows (training.loop.make_optimizer)
NO_DECAY_ATTR = "_expandlm_no_decay"
_PUA = 0xF0000  # planes 15-16 are private use: one character per old token id while learning merges

Merge = tuple[str, str]


def _merges(model: dict) -> list[Merge]:
    """A BPE model's merges as pairs (newer `tokenizers` write [a, b], older "a b")."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model.get("merges", [])]


def _is_byte_level_bpe(state: dict) -> bool:
    model, pre = state["model"], state.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return (model.get("type") == "BPE" and not model.get("continuing_subword_prefix")
            and not model.get("end_of_word_suffix") and any(p.get("type") == "ByteLevel" for p in pres)
            and (state.get("decoder") or {}).get("type") == "ByteLevel")


def _old_segments(tok: Tokenizer, texts: Iterable[str]) -> Counter[tuple[str, ...]]:
    """How often each pre-tokenized word of `texts` occurs, as the old tokens it ends up as."""
    words: Counter[str] = Counter()
    for text in texts:
        text = tok.normalizer.normalize_str(text) if tok.normalizer else text
        words.update(w for w, _ in tok.pre_tokenizer.pre_tokenize_str(text))
    return Counter({tuple(t.value for t in tok.model.tokenize(w)): c for w, c in words.items()})


def _learn_merges(vocab: dict[str, int], segments: Counter, forbidden: set[Merge], n: int) -> list[Merge]:
    """`n` BPE merges learned on top of the old segmentation of the new domain, never joining a
    forbidden pair. The `tokenizers` trainer only splits characters, so each old token becomes one
    private-use character, and a space cuts a word where a forbidden pair meets."""
    if max(vocab.values()) >= 0x10FFFE - _PUA:
        raise UserError(f"the old vocabulary is too large to expand ({len(vocab)} tokens)")
    char = {t: chr(_PUA + i) for t, i in vocab.items()}
    token = {c: t for t, c in char.items()}

    def mapped(seg: tuple[str, ...]) -> str:
        return char[seg[0]] + "".join((" " if (a, b) in forbidden else "") + char[b] for a, b in zip(seg, seg[1:]))

    alphabet = sorted({char[t] for seg in segments for t in seg})
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + n, initial_alphabet=alphabet, show_progress=False)
    learner.train_from_iterator((" ".join([mapped(s)] * c) for s, c in segments.items() if s), trainer)
    return [("".join(token[c] for c in a), "".join(token[c] for c in b))
            for a, b in _merges(json.loads(learner.to_str())["model"])]


def _select(vocab: dict[str, int], candidates: list[Merge], banned: set[str], n: int) -> list[Merge]:
    """The first `n` candidate merges that make a token not yet in the vocab from two parts that are:
    a merge whose part was skipped or banned is skipped too, so every merge stays usable, and no
    appended merge ever makes an old token (so any firing of one shows up as a new id)."""
    known, picked = set(vocab), []
    for a, b in candidates:
        if len(picked) == n:
            break
        if a in known and b in known and a + b not in known and a + b not in banned:
            known.add(a + b)
            picked.append((a, b))
    return picked


def _build(state: dict, vocab: dict[str, int], merges: list[Merge], as_lists: bool) -> Tokenizer:
    state = copy.deepcopy(state)  # pre-tokenizer, decoder, added tokens etc. stay exactly the old ones
    state["model"]["vocab"] = vocab
    state["model"]["merges"] = [list(m) if as_lists else " ".join(m) for m in merges]
    return Tokenizer.from_str(json.dumps(state))


def expand_tokenizer(old: PreTrainedTokenizerFast, new_texts: list[str], num_new_tokens: int,
                     keep_texts: Iterable[str] = (), extra_tags: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """The old byte-level BPE plus up to `num_new_tokens` tokens learned from `new_texts`.

    Ids below len(old) keep their tokens (special tokens included) and the old merges keep their order,
    so old merges always win. Any registered domain tag (or `extra_tags`) the old tokenizer lacks is
    appended first, then the learned tokens, each with the merge that makes it. The merges are learned
    by BPE on `new_texts` as the old tokenizer segments them, so each one joins a pair that really
    occurs in new-domain text after the old merges (a BPE trained from scratch on `new_texts` learns
    many merges whose parts the old merges never produce there).

    Appended merges rank last, but one still fires on old-domain text where its two parts end up
    adjacent once no old merge applies (" t" + "able" in a tokenizer that never joined them), and that
    changes the text's tokenization. With `keep_texts` (old-domain text) no pair adjacent in their old
    segmentation is ever learned, then `keep_texts` are tokenized and any new token that still shows up
    is banned (with the merges built on it) and replaced from later candidates, until none does. The
    old tokenization of `keep_texts` is then exactly unchanged (if no appended merge fires, BPE runs
    exactly the old merge sequence). On other old-domain text it is only empirically unchanged: pass a
    large, representative sample (the whole old corpus is cheap). The price: few new tokens can form
    inside words whose old pieces also meet in `keep_texts`, most of all with a small old vocabulary.
    """
    if num_new_tokens <= 0:
        raise UserError(f"number of new tokens must be positive, got {num_new_tokens}")
    state = json.loads(old.backend_tokenizer.to_str())
    if not _is_byte_level_bpe(state):
        raise UserError("vocabulary expansion needs a byte-level BPE tokenizer (such as one from "
                        "`expandlm tokenizer`, `gpt2` or `bytes`)")
    if not new_texts:
        raise UserError("no new-domain text to learn tokens from")
    vocab, old_merges = dict(state["model"]["vocab"]), _merges(state["model"])
    added = sorted(state.get("added_tokens", []), key=lambda t: t["id"])
    for t in added:  # GPT-2 style: special tokens sit after the model vocab, only in added_tokens
        vocab.setdefault(t["content"], t["id"])
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError("the old tokenizer's ids are not contiguous; cannot append tokens after them")
    specials = [t["content"] for t in added]
    for tag in special_tokens(extra_tags):
        if tag not in vocab:
            vocab[tag] = len(vocab)
            specials.append(tag)
    first_new = len(vocab)

    backend, keep = old.backend_tokenizer, list(keep_texts)
    forbidden = {p for seg in _old_segments(backend, keep) for p in zip(seg, seg[1:])}
    # Twice as many as asked: a few candidates are skipped (they make an old token) or banned below.
    candidates = _learn_merges(state["model"]["vocab"], _old_segments(backend, new_texts), forbidden,
                               2 * num_new_tokens)
    as_lists = not state["model"].get("merges") or isinstance(state["model"]["merges"][0], list)
    banned: set[str] = set()
    while True:
        picked = _select(vocab, candidates, banned, num_new_tokens)
        full = {**vocab, **{a + b: first_new + i for i, (a, b) in enumerate(picked)}}
        tok = wrap(_build(state, full, old_merges + picked, as_lists), specials)
        # The forbidden pairs make this a no-op check, unless the pre-tokenization above differs from the
        # real pipeline's (special-token strings inside the text, say).
        fired = {i for ids in (encode_texts(tok, keep) if keep else []) for i in ids if i >= first_new}
        if not fired:
            return tok
        banned |= {a + b for i, (a, b) in enumerate(picked) if first_new + i in fired}


def with_tag(tokenizer: PreTrainedTokenizerFast, tag: str) -> PreTrainedTokenizerFast:
    """The tokenizer with one more special token (a domain's tag) at the next id; all else as it was (a
    pretrained tokenizer keeps its own BOS, EOS and class, which re-wrapping it as expandlm's would not)."""
    grown = copy.deepcopy(tokenizer)
    grown.add_special_tokens({"additional_special_tokens": [tag]}, replace_extra_special_tokens=False)
    return grown


def grow_embeddings(model, new_vocab_size: int, first_new: int | None = None) -> int:
    """Give the tokens from `first_new` (default: the embedding's size) to `new_vocab_size` rows of the tied
    input/output embedding of `model`, growing it where it has too few; returns its size before.

    Old rows are copied bit for bit, so logits over the old tokens are unchanged (the softmax gains the
    new columns). New rows start at the mean of the old rows: their logit is then the mean old logit,
    which keeps the next-token distribution close to the old one (Hewitt 2021, "Initializing new word
    embeddings"); transformers' `mean_resizing` instead samples around that mean. A checkpoint whose
    embedding has rows beyond its tokenizer (padded to a multiple, as Qwen2's) gives new tokens those
    rows first; one whose tokenizer has tokens beyond its embedding (a Qwen2Tokenizer adds its
    <|endoftext|> to a tokenizer without it) gives those new rows too, at the same mean.
    """
    emb = model.get_input_embeddings()
    num_old = emb.num_embeddings
    first_new = num_old if first_new is None else first_new
    if new_vocab_size < first_new:
        raise UserError(f"cannot shrink the vocabulary from {first_new} to {new_vocab_size}")
    if new_vocab_size == first_new:
        return num_old
    trainable = emb.weight.requires_grad
    first_row = min(first_new, num_old)  # the first token with no trained row
    with torch.no_grad():
        mean = emb.weight[:first_row].mean(dim=0)
    if new_vocab_size > num_old:
        model.resize_token_embeddings(new_vocab_size, mean_resizing=False)  # re-ties lm_head, sets config.vocab_size
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[first_row:new_vocab_size] = mean
    weight.requires_grad_(trainable)  # a resized weight is a fresh Parameter; keep a frozen model frozen
    return num_old


def train_only_new_rows(model, num_old: int) -> torch.utils.hooks.RemovableHandle:
    """Make the tied embedding trainable but zero the gradient of its first `num_old` rows.

    A zero gradient alone does not keep a row fixed under AdamW: decoupled weight decay shrinks every
    row of a decayed parameter (p -= lr·wd·p) whatever its gradient. The row stays exactly unchanged
    only if the parameter gets no weight decay and its Adam moments are zero (a fresh optimizer: with
    zero gradients they stay zero, and the update is 0 / (0 + eps) = 0). So the weight is marked with
    `NO_DECAY_ATTR`, which the optimizer must honour by putting it in a weight_decay=0 group.
    Remove the returned handle to train every row again.
    """
    weight = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weight:
        raise UserError("train_only_new_rows needs tied input/output embeddings")
    if not 0 <= num_old <= weight.shape[0]:
        raise UserError(f"num_old={num_old} is outside the embedding's {weight.shape[0]} rows")
    weight.requires_grad_(True)
    setattr(weight, NO_DECAY_ATTR, True)

    def zero_old_rows(grad: torch.Tensor) -> torch.Tensor:
        # Runs once on the summed gradient of both uses (input lookup and output projection).
        grad = grad.clone()
        grad[:num_old] = 0
        return grad

    return weight.register_hook(zero_old_rows)
