"""Generation: ask a model for a domain by starting from `<|bos|><|domain|>` plus an optional prompt."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from transformers import TextStreamer, set_seed

from .config import arg, config
from .domains import Domain
from .errors import UserError
from .tokenizer import encode_texts, require_tag


@config
class SamplingConfig:
    temperature: Annotated[float, Field(ge=0)] = arg(0.8, "0 for greedy decoding")
    top_k: Annotated[int, Field(gt=0)] | None = arg(50, "sample among the k most likely tokens")
    top_p: Annotated[float, Field(gt=0, le=1)] | None = arg(0.95, "nucleus sampling: the smallest set with this mass")
    max_new_tokens: Annotated[int, Field(gt=0)] | None = arg(None, "tokens to generate (default: fill the context)")
    seed: int = arg(0, "random seed: the same seed gives the same samples")


def request_ids(tokenizer, domain: Domain, prompt: str = "") -> list[int]:
    """`<|bos|><|domain|>` + the prompt's tokens (special-token strings in the prompt stay plain text)."""
    ids = [tokenizer.bos_token_id, require_tag(tokenizer, domain)]
    if prompt:
        ids += encode_texts(tokenizer, [prompt])[0]
    return ids


@dataclass
class Sample:
    text: str            # prompt + continuation, special tokens removed
    finished: bool       # ended with <|eos|> before the length limit
    new_tokens: int


@torch.no_grad()
def generate(model, tokenizer, domain: Domain, prompt: str = "", num_samples: int = 1,
             sampling: SamplingConfig = SamplingConfig(), stream: bool = False) -> list[Sample]:
    """`num_samples` continuations (prompt included, special tokens removed), in one batch.
    With `stream`, the first sample's tokens are printed as they are produced (one sample only)."""
    ids = request_ids(tokenizer, domain, prompt)
    context = model.config.max_position_embeddings
    if len(ids) >= context:
        raise UserError(f"prompt is {len(ids)} tokens; the model's context is {context}")
    max_new = min(sampling.max_new_tokens or context, context - len(ids))
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
    samples = []
    for seq in out.tolist():
        body = seq[2:]  # the prompt and what followed it
        ended = tokenizer.eos_token_id in body[len(ids) - 2:]
        if ended:
            body = body[:body.index(tokenizer.eos_token_id, len(ids) - 2)]
        samples.append(Sample(tokenizer.decode(body, skip_special_tokens=True), ended, len(seq) - len(ids)))
    return samples
