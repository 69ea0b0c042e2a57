"""Generation: ask a model for a domain by starting from `<|bos|><|domain|>` (a plain domain: from its
tokenizer's own start) plus an optional prompt."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from transformers import TextStreamer, set_seed

from ..config import arg, config
from ..domains import Domain
from .engine import Sampler, engine_to_run, make_engine, run_batch
from ..errors import UserError
from ..data.tokenizer import encode_texts, request_prefix


@config
class SamplingConfig:
    temperature: Annotated[float, Field(ge=0)] = arg(0.8, "0 for greedy decoding")
    top_k: Annotated[int, Field(gt=0)] | None = arg(50, "sample among the k most likely tokens")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = arg(0.95, "nucleus sampling: the smallest set with this mass")
    max_new_tokens: Annotated[int, Field(gt=0)] | None = arg(None, "tokens to generate (default: fill the context)")
    seed: int = arg(0, "random seed: the same seed gives the same samples")


def request_ids(tokenizer, domain: Domain, prompt: str = "") -> list[int]:
    """The domain's request prefix (`request_prefix`) + the prompt's tokens (special-token strings in the
    prompt stay plain text)."""
    ids = request_prefix(tokenizer, domain)
    if prompt:
        ids += encode_texts(tokenizer, [prompt])[0]
    return ids


@dataclass
class Sample:
    text: str            # prompt + continuation, special tokens removed
    finished: bool       # ended with <|eos|> before the length limit
    new_tokens: int


class TextStream:
    """Text of a growing token sequence, handed out as it becomes final: a byte-level BPE token can
    end inside a UTF-8 character, so the tokens since the last whole character are held back until
    they decode to whole characters. Each token costs one short decode, however long the text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pending = tokenizer, []

    def add(self, token: int) -> str:
        """The new text that `token` completes ("" while a character is incomplete)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if text.endswith("\ufffd") and len(self.pending) < 4:  # a UTF-8 character has at most 4 bytes
            return ""
        self.pending = []
        return text


def check_length(ids: list[int], context: int) -> None:
    if len(ids) >= context:
        raise UserError(f"prompt is {len(ids)} tokens; the model's context is {context}")


def samplers(sampling: SamplingConfig, n: int) -> list[Sampler]:
    """One sampler per sample: sample i draws from seed + i, so a seed gives the same samples however
    many are asked for and whatever runs beside them."""
    greedy = sampling.temperature <= 0
    return [Sampler(sampling.temperature, None if greedy else sampling.top_k, None if greedy else sampling.top_p,
                    sampling.seed + i) for i in range(n)]


@torch.no_grad()
def generate(model, tokenizer, domain: Domain, prompt: str = "", num_samples: int = 1,
             sampling: SamplingConfig = SamplingConfig(), stream: bool = False, engine: str = "fast") -> list[Sample]:
    """`num_samples` continuations (prompt included, special tokens removed), in one batch.
    With `stream`, the first sample's tokens are printed as they are produced (one sample only).
    `engine`: "fast" (expandlm.engine, the default), "torch" (its PyTorch loop only) or "hf"
    (transformers' `generate`); greedy decoding gives the same tokens with each."""
    prompt_ids = encode_texts(tokenizer, [prompt])[0] if prompt else []
    ids = request_prefix(tokenizer, domain) + prompt_ids  # = request_ids(tokenizer, domain, prompt)
    context = model.config.max_position_embeddings
    check_length(ids, context)
    max_new = min(sampling.max_new_tokens or context, context - len(ids))
    if engine_to_run(engine, model) != "hf":
        return _generate_fast(make_engine(engine, model, num_samples), tokenizer, ids, prompt_ids, prompt, sampling,
                              max_new, stream)
    set_seed(sampling.seed)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    streamer = None
    if stream and num_samples == 1:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sys.stdout.write(prompt)
        sys.stdout.flush()
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=sampling.temperature > 0,
        temperature=sampling.temperature if sampling.temperature > 0 else None,
        top_k=sampling.top_k if sampling.temperature > 0 else None,
        top_p=sampling.top_p if sampling.temperature > 0 else None,
        max_new_tokens=max_new, num_return_sequences=num_samples, streamer=streamer,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return [_sample(tokenizer, prompt_ids, seq[len(ids):]) for seq in out.tolist()]


def _sample(tokenizer, prompt_ids: list[int], new: list[int]) -> Sample:
    """A sample from the prompt's tokens and the tokens generated after them (up to `<|eos|>`, or
    padding after it)."""
    ended = tokenizer.eos_token_id in new
    body = prompt_ids + (new[:new.index(tokenizer.eos_token_id)] if ended else new)
    return Sample(tokenizer.decode(body, skip_special_tokens=True), ended, len(new))


def _generate_fast(engine, tokenizer, ids, prompt_ids, prompt, sampling, max_new, stream) -> list[Sample]:
    num_samples = engine.slots
    new = [[] for _ in range(num_samples)]
    shown = TextStream(tokenizer) if stream and num_samples == 1 else None
    if shown:
        sys.stdout.write(prompt)
    for step in run_batch(engine, ids, samplers(sampling, num_samples), max_new, tokenizer.eos_token_id):
        for row, token in step:
            new[row].append(token)
            if shown and token != tokenizer.eos_token_id:
                sys.stdout.write(shown.add(token))
                sys.stdout.flush()
    return [_sample(tokenizer, prompt_ids, tokens) for tokens in new]
