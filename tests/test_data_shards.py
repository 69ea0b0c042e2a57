import numpy as np
import pytest
import torch

from expandlm.data.corpus import load_corpus
from expandlm.domains import get_domain
from expandlm.errors import UserError
from expandlm.data.shards import PackedBatches, build_shard
from expandlm.data.tokenizer import encode_texts, train_bpe
from tests.conftest import STORIES


@pytest.fixture
def corpus(stories_file):
    return load_corpus(stories_file, get_domain("stories"))


@pytest.fixture
def tok(corpus):
    return train_bpe(corpus.documents, 300)


def test_shard_layout_and_meta(corpus, tok, tmp_path):
    shard = build_shard(corpus, tok, tmp_path)
    docs = list(shard.documents())
    tag = tok.convert_tokens_to_ids("<|stories|>")
    assert len(docs) == len(STORIES) == shard.meta["documents"]
    expected = [tok.bos_token_id, tag, *encode_texts(tok, [STORIES[0]])[0], tok.eos_token_id]
    assert docs[0].tolist() == expected
    assert shard.meta["tokens"] == sum(len(d) for d in docs) == len(shard.tokens)
    assert shard.meta["bytes"] == sum(len(s.encode()) for s in STORIES) == shard.doc_bytes.sum()
    assert shard.tokens.dtype == np.uint16


def test_cache_reuses_same_content(corpus, tok, tmp_path):
    a = build_shard(corpus, tok, tmp_path)
    stamp = (a.path / "tokens.bin").stat().st_mtime_ns
    b = build_shard(corpus, tok, tmp_path)
    assert b.path == a.path and (b.path / "tokens.bin").stat().st_mtime_ns == stamp
    other_tok = train_bpe(corpus.documents, 280)
    assert build_shard(corpus, other_tok, tmp_path).path != a.path
    assert not list((tmp_path / "shards").glob("*.tmp-*"))


def test_gpt2_ids_fit_uint16(corpus, shared_data, tmp_path):
    from expandlm.data.tokenizer import gpt2_tokenizer
    shard = build_shard(corpus, gpt2_tokenizer(shared_data / "tokenizers" / "gpt2"), tmp_path)
    assert shard.meta["dtype"] == "uint16" and shard.tokens.dtype == np.uint16  # 50,262 ids fit


def test_uint32_for_a_vocabulary_past_65536(corpus, tmp_path):
    from expandlm.data.tokenizer import bytes_tokenizer
    tok = bytes_tokenizer()
    tok.add_tokens([f"<filler{i}>" for i in range(65536)] + ["cat"])  # "cat" gets an id past uint16
    cat = tok.convert_tokens_to_ids("cat")
    assert cat > np.iinfo(np.uint16).max
    shard = build_shard(corpus, tok, tmp_path)
    assert shard.meta["dtype"] == "uint32" and shard.tokens.dtype == np.uint32
    first = next(doc for doc in shard.documents() if cat in doc)  # stored whole, not wrapped around
    assert first.max() == cat and int((shard.tokens == cat).sum()) == sum(
        ids.count(cat) for ids in encode_texts(tok, corpus.documents))


def test_batches_deterministic_disjoint_and_cover_an_epoch(corpus, tok, tmp_path):
    shard = build_shard(corpus, tok, tmp_path)
    b = PackedBatches([shard], context=16, batch_size=4, seed=1)
    again = PackedBatches([shard], context=16, batch_size=4, seed=1)
    assert torch.equal(b.batch(3), again.batch(3))
    assert not torch.equal(b.batch(3), PackedBatches([shard], 16, 4, seed=2).batch(3))
    assert b.batch(0).shape == (4, 17)
    r0, r1 = b.batch(5, rank=0, world=2), b.batch(5, rank=1, world=2)
    assert not torch.equal(r0, r1)
    # one epoch visits every window once
    n = len(b.windows)
    seen = torch.cat([b.batch(i) for i in range(n // 4)])
    starts = {tuple(row[:16].tolist()) for row in seen}
    assert len(starts) == len(seen)
    tokens = np.asarray(shard.tokens, dtype=np.int64)
    row = b.batch(0)[0].numpy()
    assert any((tokens[s:s + 17] == row).all() for s in range(0, len(tokens) - 16, 16))


def test_too_little_data_for_context(corpus, tok, tmp_path):
    with pytest.raises(UserError, match="too small for context"):
        PackedBatches([build_shard(corpus, tok, tmp_path)], context=100_000, batch_size=2, seed=0)
