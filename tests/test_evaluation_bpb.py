import math

import numpy as np
import pytest
import torch

from expandlm.data.corpus import Corpus
from expandlm.domains import get_domain
from expandlm.evaluation.bpb import evaluate_bpb, score_windows
from expandlm.model.llama import PRESETS, build_model
from expandlm.data.shards import build_shard
from expandlm.data.tokenizer import bytes_tokenizer

DOCS = ["short one.", "a somewhat longer document that will need several windows " * 6, "mid length text here"]


def _setup(tmp_path, docs=DOCS):
    tok = bytes_tokenizer()
    shard = build_shard(Corpus(get_domain("stories"), "mem", docs, f"mem-{len(docs)}"), tok, tmp_path)
    return tok, shard


@pytest.mark.parametrize("prefix", [2, 1])  # <|bos|><|domain|>; a plain domain's BOS
def test_windows_score_every_target_once(prefix):
    for length in (5, 16, 17, 40, 100):
        doc = np.arange(length)
        scored = []
        for window, first in score_windows(doc, 16, prefix):
            assert len(window) <= 16
            start = int(window[0])
            scored += list(range(start + first, start + len(window)))
            assert first >= 8 or start == 0  # at least half a context before each later target
        assert scored == list(range(prefix, length))


def test_uniform_model_gives_log_vocab_bits_per_token(tmp_path):
    tok, shard = _setup(tmp_path)
    model = build_model(PRESETS["nano"], tok)
    vocab = len(tok)
    zero = lambda ids: torch.zeros(*ids.shape, vocab)  # noqa: E731
    result = evaluate_bpb(model, shard, context=16, forward=zero)
    # bytes tokenizer: every byte one token, plus one <|eos|> per document
    n_bytes = sum(len(d.encode()) for d in DOCS)
    assert result["tokens_scored"] == n_bytes + len(DOCS)
    assert math.isclose(result["bpb"], (n_bytes + len(DOCS)) * math.log2(vocab) / n_bytes, rel_tol=1e-6)


def test_bpb_matches_direct_computation(tmp_path):
    short = [DOCS[0], DOCS[2]]
    tok, shard = _setup(tmp_path, short)
    model = build_model(PRESETS["nano"], tok, seed=0).eval()
    result = evaluate_bpb(model, shard)  # every document fits the context: one pass each
    nats = 0.0
    for doc in shard.documents():
        ids = torch.from_numpy(doc)[None]
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nats += -logp[torch.arange(1, len(doc) - 1), ids[0, 2:]].sum().item()  # given <|bos|><|domain|>
    n_bytes = sum(len(d.encode()) for d in short)
    assert math.isclose(result["bpb"], nats / math.log(2) / n_bytes, rel_tol=1e-5)
    assert evaluate_bpb(model, shard, max_docs=1)["documents"] == 1
