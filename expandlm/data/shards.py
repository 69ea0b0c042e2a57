"""Token shards: a corpus tokenized once into a memory-mapped token file, cached by content.

A shard folder holds `tokens.bin` (uint16 when the vocabulary fits, else uint32), `doc_starts.npy`
(offset of each document's `<|bos|>`, plus the end) and `meta.json` (documents, tokens, UTF-8 bytes,
tokenizer hash, and `prefix`, the request tokens each document starts with). Documents are stored as
`<|bos|><|domain|>text<|eos|>`, a plain domain's as its tokenizer starts a text, then text and EOS
(`request_prefix`; docs/DESIGN.md, "Pipeline and layout").
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_path
from .corpus import Corpus
from ..errors import UserError
from .tokenizer import request_prefix, text_encoder, tokenizer_hash

FORMAT_VERSION = 1
ENCODE_BATCH = 4096  # documents per encode_batch call: bounds memory on hub-sized corpora


def default_cache_dir() -> Path:
    return Path(os.environ.get("EXPANDLM_CACHE", Path.home() / ".cache" / "expandlm"))


@dataclass
class TokenShard:
    path: Path
    meta: dict

    @property
    def tokens(self) -> np.memmap:
        return np.memmap(self.path / "tokens.bin", dtype=self.meta["dtype"], mode="r")

    @property
    def doc_starts(self) -> np.ndarray:
        return np.load(self.path / "doc_starts.npy")

    @property
    def prefix(self) -> int:
        """How many tokens each document starts with that are given, not scored (shards cached before
        plain domains were: `<|bos|><|domain|>`)."""
        return self.meta.get("prefix", 2)

    @property
    def doc_bytes(self) -> np.ndarray:
        """UTF-8 bytes of each document's text (the denominator of bits per byte)."""
        return np.load(self.path / "doc_bytes.npy")

    def documents(self, limit: int | None = None):
        """Token ids of each document, its request prefix to `<|eos|>` inclusive."""
        tokens, starts = self.tokens, self.doc_starts[: None if limit is None else limit + 1]
        for a, b in zip(starts[:-1], starts[1:]):
            yield np.asarray(tokens[a:b], dtype=np.int64)


def shard_key(corpus: Corpus, tok_hash: str) -> str:
    raw = f"{FORMAT_VERSION}|{corpus.domain.name}|{corpus.fingerprint}|{tok_hash}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def build_shard(corpus: Corpus, tokenizer, cache_dir: Path | None = None, foreign: bool = False) -> TokenShard:
    """Tokenize `corpus` (or reuse the cached result for the same content and tokenizer).

    `foreign`: the text of a domain the model was not trained for (evaluated for forgetting or transfer),
    whose tag the tokenizer may lack (a user's domain); the padding token then stands in for it, a
    special token the model never saw as input, as it never saw an untrained built-in domain's tag."""
    cache_dir = Path(cache_dir or default_cache_dir())
    tok_hash = tokenizer_hash(tokenizer)
    stand_in = foreign and not corpus.domain.plain and corpus.domain.tag not in tokenizer.get_vocab()
    # a plain domain's documents start otherwise than a tagged one's of the same name and tokenizer
    key = shard_key(corpus, tok_hash) + ("-pad-tag" if stand_in else "-plain" if corpus.domain.plain else "")
    folder = cache_dir / "shards" / f"{corpus.domain.name}-{key}"
    if (folder / "meta.json").exists():
        return TokenShard(folder, json.loads((folder / "meta.json").read_text()))

    eos = tokenizer.eos_token_id
    prefix = [tokenizer.bos_token_id, tokenizer.pad_token_id] if stand_in else request_prefix(tokenizer, corpus.domain)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    encoder = text_encoder(tokenizer)
    with atomic_path(folder, folder=True) as tmp:  # readers see a complete shard or none
        starts, total = [0], 0
        with open(tmp / "tokens.bin", "wb") as out:
            for i in range(0, len(corpus.documents), ENCODE_BATCH):
                batch = corpus.documents[i:i + ENCODE_BATCH]
                for enc in encoder.encode_batch(batch, add_special_tokens=False):
                    ids = np.asarray([*prefix, *enc.ids, eos], dtype=dtype)
                    out.write(ids.tobytes())
                    total += len(ids)
                    starts.append(total)
        np.save(tmp / "doc_starts.npy", np.asarray(starts, dtype=np.int64))
        np.save(tmp / "doc_bytes.npy", np.asarray([len(d.encode("utf-8")) for d in corpus.documents]))
        meta = {"format": FORMAT_VERSION, "domain": corpus.domain.name, "source": corpus.source,
                "fingerprint": corpus.fingerprint, "tokenizer_hash": tok_hash, "dtype": np.dtype(dtype).name,
                "documents": len(corpus.documents), "tokens": total, "bytes": corpus.num_bytes,
                "vocab_size": len(tokenizer), "prefix": len(prefix)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return TokenShard(folder, json.loads((folder / "meta.json").read_text()))


class PackedBatches:
    """Deterministic training batches: the token streams are cut into non-overlapping windows of
    `context + 1` tokens; each epoch visits all windows in a seeded random order. Batch `m` is a pure
    function of (seed, m), so a resumed run sees exactly the data an uninterrupted one would, and
    `rank`/`world` give each data-parallel process its own disjoint samples.

    With `weights` (one per shard: a data mixture such as replay's), each sample first draws its shard
    with those probabilities, then a window of that shard, from a generator seeded by (seed, batch)."""

    def __init__(self, shards: list[TokenShard], context: int, batch_size: int, seed: int,
                 weights: list[float] | None = None):
        self.shards, self.context, self.batch_size, self.seed = shards, context, batch_size, seed
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        self._tokens = [s.tokens for s in shards]
        index = []
        for k, shard in enumerate(shards):
            n = shard.meta["tokens"]
            starts = np.arange(0, n - context - 1 + 1, context, dtype=np.int64)
            index.append(np.stack([np.full_like(starts, k), starts], axis=1))
        self.windows = np.concatenate(index) if index else np.zeros((0, 2), np.int64)
        if len(self.windows) == 0:
            sizes = ", ".join(f"{s.meta['source']} ({s.meta['tokens']} tokens)" for s in shards)
            raise UserError(f"training data too small for context {context}: {sizes}")
        self._epoch, self._perm = -1, None
        if self.weights is not None:
            if len(self.weights) != len(shards) or (self.weights < 0).any() or self.weights.sum() <= 0:
                raise UserError(f"mixture weights {weights} do not fit {len(shards)} shards")
            self._by_shard = [np.flatnonzero(self.windows[:, 0] == k) for k in range(len(shards))]

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.windows) * self.context

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.windows), generator=g).numpy(), epoch
        return self._perm

    def _mixed(self, micro_step: int, rank: int) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + micro_step) * 1009 + rank)
        picks = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g).tolist()
        out = []
        for k in picks:
            rows = self._by_shard[k]
            out.append(tuple(self.windows[rows[int(torch.randint(len(rows), (1,), generator=g))]]))
        return out

    def picks(self, micro_step: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
        """The (shard, start) of each window of batch `micro_step`."""
        if self.weights is not None:
            return self._mixed(micro_step, rank)
        first = (micro_step * world + rank) * self.batch_size
        return [tuple(self.windows[self._order(i // len(self.windows))[i % len(self.windows)]])
                for i in range(first, first + self.batch_size)]

    def batch(self, micro_step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        rows = [np.asarray(self._tokens[k][start:start + self.context + 1], dtype=np.int64)
                for k, start in self.picks(micro_step, rank, world)]
        return torch.from_numpy(np.stack(rows))
