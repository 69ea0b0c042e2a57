"""Windows and next-token losses over a model of any vocabulary.

A training or evaluation window is `context` tokens: `--context` where given, else the model's own
context capped at `DEFAULT_CONTEXT` (a pretrained checkpoint's is 8,192 to 131,072 positions, which no
fine-tune on this scale needs: TRL's SFT default is 1,024 too).

`next_token_nll` never holds a whole batch's logits over a large vocabulary: the head is applied to
chunks of the final hidden states, each recomputed in the backward pass (`torch.utils.checkpoint`),
so a 49k-token head over a batch of 1,024-token windows holds one chunk of logits at a time. No
maintained CPU implementation exists (Liger's fused linear cross entropy and Apple's cut-cross-entropy
are GPU kernels), hence these few lines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import UserError

DEFAULT_CONTEXT = 1024   # the cap on a model's own context for training and evaluation windows
LOGITS_AT_ONCE = 1 << 26  # floats of logits (256 MiB in fp32) a batch may hold before the head is chunked
CHUNK_LOGITS = 1 << 24    # floats of logits per chunk
# config fields that change the logits after the head (softcapping, scaling): such models keep their own forward
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logits_scaling", "logit_scale", "output_multiplier_scale")


def window(model_context: int, context: int | None, where: str = "--context") -> int:
    """The window length: `context` (at most the model's), or the model's own capped at DEFAULT_CONTEXT."""
    if context is None:
        return min(model_context, DEFAULT_CONTEXT)
    if context > model_context:
        raise UserError(f"{where} {context}: longer than the model's context of {model_context} tokens "
                        "(its max_position_embeddings)")
    return context


def _head_and_body(model):
    """(decoder, output head) of a standard transformers causal LM whose logits are exactly the head applied
    to the decoder's last hidden state; None for anything else (a routed view, a wrapped model). A view of
    one domain (`paths.DomainView`: an adapter on or off, a path of blocks) is no module: its decoder, called
    alone, would run without the domain's arguments and context, so it is called whole."""
    if not isinstance(model, torch.nn.Module):
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: its adapters stay in
    get_decoder, get_head = getattr(inner, "get_decoder", None), getattr(inner, "get_output_embeddings", None)
    if get_decoder is None or get_head is None or not hasattr(inner, "config"):
        return None
    if any(getattr(inner.config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or decoder is inner or not isinstance(head, torch.nn.Linear):
        return None
    return decoder, head


def _chunk_nll(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def next_token_nll(model, input_ids: torch.Tensor, targets: torch.Tensor, forward=None,
                   reduction: str = "none") -> torch.Tensor:
    """NLL (nats) of `targets` (batch × positions) given `input_ids`: per position, or with reduction "mean"
    their mean. `forward(ids) -> logits` overrides the model call (routed views); otherwise a large
    vocabulary's head runs in chunks."""
    parts = None if forward is not None else _head_and_body(model)
    if parts is None or input_ids.numel() * parts[1].out_features <= LOGITS_AT_ONCE:
        logits = forward(input_ids) if forward is not None else model(input_ids=input_ids).logits
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        return nll if reduction == "mean" else nll.view(targets.shape)
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state.reshape(-1, head.in_features)
    flat, rows = targets.reshape(-1), max(1, CHUNK_LOGITS // head.out_features)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    chunks = [checkpoint(_chunk_nll, hidden[i:i + rows], head.weight, head.bias, flat[i:i + rows], use_reentrant=False)
              if grad else _chunk_nll(hidden[i:i + rows], head.weight, head.bias, flat[i:i + rows])
              for i in range(0, len(flat), rows)]
    nll = torch.cat(chunks)
    return nll.mean() if reduction == "mean" else nll.view(targets.shape)
