"""Evaluation: bits per byte of a domain's validation documents (docs/DESIGN.md, "Metrics").

bpb = total next-token NLL (nats) of each document's text tokens and its `<|eos|>`, given the request
prefix `<|bos|><|domain|>` (a plain domain's: what its tokenizer starts a text with), / ln 2 / total
UTF-8 bytes of the documents' text. It is comparable
across tokenizers, unlike per-token loss. A document longer than the context is scored in windows
that overlap by half a context, so every token is scored once with at least half a context before it.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import numpy as np
import torch

from ..data.shards import TokenShard
from ..model.window import LOGITS_AT_ONCE, next_token_nll, window

def score_windows(doc: np.ndarray, context: int, prefix: int):
    """(window tokens, index within the window of the first target to score); the `prefix` request
    tokens are given, not scored."""
    if len(doc) <= context:
        yield doc, prefix
        return
    stride, scored_to = context // 2, context  # the first window scores targets prefix..context-1
    yield doc[:context], prefix
    start = stride
    while scored_to < len(doc):
        end = min(start + context, len(doc))
        yield doc[start:end], scored_to - start
        scored_to, start = end, start + stride


@torch.no_grad()
def evaluate_bpb(model, shard: TokenShard, max_docs: int | None = None, batch_tokens: int = 16384,
                 context: int | None = None, forward=None) -> dict:
    """bpb of `model` on the documents of `shard` (the first `max_docs` of them when given), in windows of
    `context` tokens (default: the model's context, capped: `model.window`).

    `forward(input_ids) -> logits` overrides the plain model call (strategies that route a domain
    through its own path use it)."""
    context = window(model.config.max_position_embeddings, context)
    # Bound the logits tensor (tokens × vocabulary floats): GPT-2's 50k vocabulary would otherwise
    # need several GB per batch.
    batch_tokens = max(context, min(batch_tokens, LOGITS_AT_ONCE // model.config.vocab_size))
    device = next(model.parameters()).device
    pad = model.config.pad_token_id or 0
    was_training = model.training
    model.eval()
    windows = [w for doc in shard.documents(max_docs) for w in score_windows(doc, context, shard.prefix)]
    windows.sort(key=lambda w: len(w[0]))  # batch windows of similar length: less padding
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    nats, scored, i = 0.0, 0, 0
    while i < len(windows):
        width = len(windows[i][0])
        n = max(1, batch_tokens // width)
        batch = windows[i:i + n]
        width = max(len(w) for w, _ in batch)
        # Right padding needs no attention mask: causal attention never looks at later positions.
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for r, (w, first) in enumerate(batch):
            ids[r, :len(w)] = torch.from_numpy(w)
            mask[r, first:len(w)] = True
        ids, mask = ids.to(device), mask.to(device)
        with autocast:
            nll = next_token_nll(model, ids[:, :-1], ids[:, 1:], forward=forward)
        target_mask = mask[:, 1:]
        nats += nll[target_mask].double().sum().item()
        scored += int(target_mask.sum())
        i += len(batch)
    model.train(was_training)
    doc_bytes = shard.doc_bytes[:max_docs] if max_docs else shard.doc_bytes
    num_bytes = int(doc_bytes.sum())
    return {"bpb": nats / math.log(2) / num_bytes, "nats": nats, "tokens_scored": scored,
            "bytes": num_bytes, "documents": len(doc_bytes), "nats_per_token": nats / max(scored, 1)}
