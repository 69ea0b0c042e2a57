"""Tokenizers: custom byte-level BPE per domain, and the generic baselines (GPT-2, raw bytes).

Every tokenizer is a `transformers` fast tokenizer, so `AutoTokenizer.from_pretrained(dir)` loads what
we save. Byte-level BPE with no normalizer has no unknown token and round-trips any UTF-8 text exactly.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..domains import Domain, builtin_tags
from ..errors import UserError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
GENERIC = ("gpt2", "bytes")


def special_tokens(extra_tags: Iterable[str] = ()) -> list[str]:
    """bos/eos/pad, then the built-in domains' tags (so one tokenizer can serve each of them), then
    `extra_tags` (a user's domains that the tokenizer is trained for)."""
    tags = list(dict.fromkeys([*builtin_tags(), *extra_tags]))
    return [BOS, EOS, PAD, *tags]


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def wrap(tok: Tokenizer, specials: list[str], bos: str | None = BOS, eos: str | None = EOS,
         pad: str | None = PAD) -> PreTrainedTokenizerFast:
    """A `transformers` tokenizer around a `tokenizers` one, with our special tokens registered (`bos`,
    `eos`, `pad`: which of them play those parts; a pretrained tokenizer's own may be other ones)."""
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
        additional_special_tokens=[s for s in specials if s not in (bos, eos, pad)],
        # transformers' default clean-up rewrites " ." to "." and would break the exact round trip.
        clean_up_tokenization_spaces=False, model_max_length=1 << 30)


def train_bpe(texts: Iterable[str], vocab_size: int, extra_tags: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE fitted to `texts`; ids 0..k-1 are the special tokens, then the 256 bytes, then merges."""
    specials = special_tokens(extra_tags)
    if vocab_size < 256 + len(specials):
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
                        f"{256 + len(specials)} (256 bytes + {len(specials)} special tokens)")
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return wrap(tok, specials)


def bytes_tokenizer(extra_tags: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Generic baseline: the 256 bytes and the special tokens, no merges."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _BYTE_OF_CHAR[c])
    tok = _byte_level(Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[])))
    return wrap(tok, special_tokens(extra_tags))


def _gpt2_byte_map() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (the byte-level alphabet), to sort by byte value."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_OF_CHAR = _gpt2_byte_map()


def gpt2_tokenizer(files_dir: Path | None, extra_tags: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Generic baseline: GPT-2's 50,257-token BPE, from local vocab.json + merges.txt, else the hub."""
    if files_dir is not None and (files_dir / "vocab.json").exists():
        model = models.BPE.from_file(str(files_dir / "vocab.json"), str(files_dir / "merges.txt"))
        return wrap(_byte_level(Tokenizer(model)), special_tokens(extra_tags))
    try:
        hub = AutoTokenizer.from_pretrained("gpt2")
    except Exception as e:
        raise UserError(f"GPT-2 tokenizer files not found locally and the hub is unreachable: {e}") from None
    return wrap(Tokenizer.from_str(hub.backend_tokenizer.to_str()), special_tokens(extra_tags))


def load_tokenizer(spec: str | os.PathLike, data_dir: Path | None = None, extra_tags: Iterable[str] = (),
                   model_config=None) -> PreTrainedTokenizerFast:
    """A saved tokenizer folder, or a generic baseline by name (`gpt2`, `bytes`; with `extra_tags`, the
    tags of a user's domains, as `train_bpe`). `model_config`: the config of the model the folder will hold,
    when its config.json is not written yet; transformers picks the tokenizer class by the model type (a
    Qwen2 model's folder loads as `Qwen2Tokenizer`, which splits text with Qwen's own pre-tokenizer)."""
    spec = str(spec)
    if spec == "bytes":
        return bytes_tokenizer(extra_tags)
    if spec == "gpt2":
        return gpt2_tokenizer(data_dir / "tokenizers" / "gpt2" if data_dir else None, extra_tags)
    path = Path(spec)
    if not (path / "tokenizer.json").exists():
        raise UserError(f"{path}: no tokenizer.json here; expected a folder written by "
                        f"`expandlm tokenizer` or `expandlm train`, or one of {', '.join(GENERIC)}")
    return AutoTokenizer.from_pretrained(path, config=model_config)


def require_tag(tokenizer: PreTrainedTokenizerFast, domain: Domain, source: str = "the tokenizer") -> int:
    """The id of the domain's tag token; an error if this tokenizer was not built for that domain."""
    tid = tokenizer.convert_tokens_to_ids(domain.tag)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != domain.tag:
        raise UserError(f"{source} has no tag token {domain.tag} for domain '{domain.name}'")
    return tid


def request_prefix(tokenizer: PreTrainedTokenizerFast, domain: Domain) -> list[int]:
    """The tokens every text of `domain` starts from, given and never scored: `<|bos|><|domain|>`, or for
    a plain domain (a pretrained model's own behaviour) what its tokenizer puts before a text. Training
    documents, bpb, requests, routing and serving all start here (docs/DESIGN.md, "Pipeline and layout")."""
    if domain.plain:
        return start_tokens(tokenizer)
    return [tokenizer.bos_token_id, require_tag(tokenizer, domain)]


def start_tokens(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """What the tokenizer itself adds before a text (Llama's and Mistral's BOS). One that adds nothing
    (Qwen2's) still needs a token to predict the first one from: its BOS, else its EOS, the token a
    text follows in its pretraining stream (lm-evaluation-harness starts such models from it too)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    text = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(text) + 1):
        if with_special[start:start + len(text)] == text:
            if start:
                return with_special[:start]
            break
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if first is None:
        raise UserError("the tokenizer has no BOS or EOS token to start a text from")
    return [first]


def tokenizer_hash(tokenizer: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def text_encoder(tokenizer: PreTrainedTokenizerFast) -> Tokenizer:
    """A copy of the backend that treats special-token strings inside documents as plain text, so a
    story that happens to contain "<|eos|>" cannot inject control tokens. Batch encoding on it runs
    in parallel threads in Rust, which is why corpus tokenization needs no process pool."""
    enc = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    enc.encode_special_tokens = True
    return enc


def encode_texts(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in text_encoder(tokenizer).encode_batch(texts, add_special_tokens=False)]
