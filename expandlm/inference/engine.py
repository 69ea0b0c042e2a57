"""The fast decode engine: a lean KV-cache loop over a Llama model's weights, batched over sequences.

Hand-written because no maintained library gives a fast CPU single-stream loop for this model class:
transformers' `generate` spends most of a small model's step in Python (cache objects, mask
building, logits processors, per-module hooks), llama.cpp needs a GGUF export and its own build,
and vLLM/TGI do not target CPUs of this size. The engine runs the same computation as
`LlamaForCausalLM` (RMSNorm, RoPE from the model's own rotary module, attention, SwiGLU, tied head)
on weights read once from the model, fused where that saves work (q/k/v in one matmul, gate/up in
one), with a pre-allocated cache, and gives the same greedy tokens as `model.generate`
(tests/test_inference_engine.py). A prompt goes through in one PyTorch pass (a prompt of a few tokens, through
the C step); each decode step is one call into `decode_kernel.c` (compiled at first use with the
system compiler, as llama2.c's run.c is built), or, where no compiler is found (or with
`kernel=False`: engine "torch"), a PyTorch loop of about twenty operations per block.

It reads the weights of one plain Llama model: for a model folder, what `ServedModel.decode_model`
gives, its format's export of one domain (a LoRA adapter merged, a gated path as its blocks alone).
The model itself is never changed.

Sequences live in slots (rows of the cache): `prefill` puts a prompt into a free slot, `decode`
advances every given slot by one token in one batched step, so requests can join and leave a running
batch (continuous batching).
"""
from __future__ import annotations

import ctypes
import hashlib
import inspect
import math
import mmap
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError, unknown
from ..model.blocks import decoder_blocks, final_norm

# `generate` and `serve`: the engine with its C decode step, the engine's PyTorch loop only, transformers'
ENGINES = ("fast", "torch", "hf")
# architectures laid out as Llama's weights (Mistral adds a sliding window, Qwen2 q/k/v biases); what
# the loop does not compute (biases, a window that bites, scaled RoPE) goes to transformers (`supported`)
LLAMA_SHAPED = ("llama", "mistral", "qwen2")
KERNEL_SOURCE = Path(__file__).with_name("decode_kernel.c")
_kernel_lock = threading.Lock()
_kernel_lib: list = []  # the loaded library, once per process ([None]: no compiler here)


def _compile_kernel():
    """decode_kernel.c as a shared library, built once per machine and source into the cache folder
    (-march=native: the cache key names the machine)."""
    from ..atomic import atomic_path
    from ..data.shards import default_cache_dir

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    source = KERNEL_SOURCE.read_bytes()
    key = hashlib.sha256(source + platform.node().encode() + platform.machine().encode()).hexdigest()[:16]
    lib = default_cache_dir() / "kernels" / f"decode-{key}.so"
    if not lib.exists():
        with atomic_path(lib) as tmp:
            result = subprocess.run([cc, "-O3", "-ffast-math", "-march=native", "-shared", "-fPIC", "-o", str(tmp),
                                     str(KERNEL_SOURCE), "-lm"], capture_output=True, text=True)
            if result.returncode != 0:
                warnings.warn(f"expandlm: could not compile {KERNEL_SOURCE.name} ({result.stderr.strip()[:300]}); "
                              "the engine decodes with PyTorch")
                raise _NoKernel()
    library = ctypes.CDLL(str(lib))
    library.decode_step.restype = None
    return library


class _NoKernel(Exception):
    pass


def load_kernel():
    """The compiled decode step, or None where it cannot be built."""
    with _kernel_lock:
        if not _kernel_lib:
            try:
                _kernel_lib.append(_compile_kernel())
            except _NoKernel:
                _kernel_lib.append(None)
        return _kernel_lib[0]


_P = ctypes.c_void_p


class _KernelModel(ctypes.Structure):
    """`Model` of decode_kernel.c."""
    _fields_ = ([(n, ctypes.c_int) for n in ("dim", "hidden", "layers", "heads", "kv_heads", "head_dim", "vocab",
                                            "context", "slots")]
                + [("eps", ctypes.c_float)] + [(n, _P) for n in ("embed", "head", "norm", "cos", "sin")]
                + [(n, ctypes.POINTER(_P)) for n in ("attn_norm", "wqkv", "wo", "ffn_norm", "wgate_up", "wdown")]
                + [("k_cache", _P), ("v_cache", _P)])


@dataclass
class Block:
    attn_norm: torch.Tensor
    wqkv: torch.Tensor      # [q; k; v] rows, one matmul
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    wgate_up: torch.Tensor  # [gate; up] rows, one matmul
    wdown: torch.Tensor


def supported(model) -> str | None:
    """Why the engine cannot run `model` (None: it can)."""
    if hasattr(model, "peft_config"):
        return "a PEFT model, not one set of weights (e.g. LoRA experts routed per token: arrow)"
    if not isinstance(model, torch.nn.Module):
        return "a view of a model shared by several domains (give it one domain's export)"
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in LLAMA_SHAPED:
        return f"model type {kind or type(model).__name__!r} (it runs {', '.join(LLAMA_SHAPED)})"
    if cfg.hidden_act != "silu":
        return f"activation {cfg.hidden_act!r} (it runs silu)"
    layers, _ = decoder_blocks(model)
    first = layers[0] if len(layers) else None
    projections = [first.self_attn.q_proj, first.self_attn.k_proj, first.self_attn.v_proj, first.self_attn.o_proj,
                   first.mlp.gate_proj, first.mlp.up_proj, first.mlp.down_proj] if first is not None else []
    if any(p.bias is not None for p in projections):
        return f"biased projections ({kind}'s attention biases)" if kind == "qwen2" else "biased projections"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and window < cfg.max_position_embeddings:
        return f"sliding-window attention ({window} of {cfg.max_position_embeddings} positions)"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}"
    return None


def engine_to_run(name: str, model) -> str:
    """`name`, or "hf" (transformers' generate) where the lean loop cannot run `model`: said in one line
    on stderr, where `generate --json` keeps its stdout clean."""
    why = None if name == "hf" else supported(model)
    if why is None:
        return name
    print(f"[engine {name}: cannot run this model ({why}); generating with transformers]", file=sys.stderr)
    return "hf"


class DecodeEngine:
    """The weights of one plain Llama model and a KV cache of `slots` sequences."""

    def __init__(self, model, slots: int = 1, kernel: bool = True):
        why = supported(model)
        if why:
            raise UserError(f"the fast engine cannot run this model: {why}; use engine 'hf'")
        llama, cfg = model, model.config
        self.config = cfg
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.context, self.eps = cfg.max_position_embeddings, cfg.rms_norm_eps
        self.scale = 1 / math.sqrt(self.head_dim)
        layers, _ = decoder_blocks(llama)
        embedding = llama.get_input_embeddings()
        with torch.no_grad():
            self.blocks = [Block(
                b.input_layernorm.weight.detach().clone(),
                torch.cat([b.self_attn.q_proj.weight, b.self_attn.k_proj.weight,
                           b.self_attn.v_proj.weight]).detach().contiguous(),
                b.self_attn.o_proj.weight.detach().clone(),
                b.post_attention_layernorm.weight.detach().clone(),
                torch.cat([b.mlp.gate_proj.weight, b.mlp.up_proj.weight]).detach().contiguous(),
                b.mlp.down_proj.weight.detach().clone()) for b in layers]
            self.embed = embedding.weight.detach().clone()
            head = llama.get_output_embeddings() if hasattr(llama, "get_output_embeddings") else None
            self.head = self.embed if head is None or head.weight is embedding.weight \
                else head.weight.detach().clone()
            self.norm = final_norm(llama).weight.detach().clone()
            # the model's own rotary module, so the tables are exactly the ones it uses
            positions = torch.arange(self.context, device=self.embed.device)[None]
            cos, sin = llama.model.rotary_emb(self.embed[None, :1], positions)
            self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [context, head_dim]
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self._pack_weights()
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.hidden = self.blocks[0].wdown.shape[1] if self.blocks else 0
        self.slots = slots
        shape = (len(self.blocks), slots, self.context, self.kv_heads, self.head_dim)
        self.k_cache, self.v_cache = (_in_huge_pages([torch.zeros(shape, dtype=self.dtype, device=self.device)])[0]
                                      for _ in range(2))
        self.lengths = [0] * slots  # tokens in each slot's cache
        self._kernel = self._bind_kernel() if kernel else None

    def _pack_weights(self) -> None:
        """Every weight into one buffer of huge pages (on the CPU), in the order a step reads them."""
        names = ("attn_norm", "wqkv", "wo", "ffn_norm", "wgate_up", "wdown")
        tensors = [getattr(b, n) for b in self.blocks for n in names] + [self.embed, self.norm]
        untied = self.head is not self.embed
        packed = _in_huge_pages(tensors + ([self.head] if untied else []))
        for i, b in enumerate(self.blocks):
            for j, n in enumerate(names):
                setattr(b, n, packed[i * len(names) + j])
        self.embed, self.norm = packed[len(self.blocks) * len(names):][:2]
        self.head = packed[-1] if untied else self.embed

    def _bind_kernel(self):
        """The C decode step over this engine's tensors (None where it does not apply)."""
        if self.device.type != "cpu" or self.dtype != torch.float32 or self.q_size != self.embed.shape[1] \
                or not self.blocks:
            return None
        library = load_kernel()
        if library is None:
            return None
        ptr = lambda t: ctypes.c_void_p(t.data_ptr())  # noqa: E731
        per_layer = lambda name: (_P * len(self.blocks))(*[getattr(b, name).data_ptr() for b in self.blocks])  # noqa: E731
        self._layer_pointers = {n: per_layer(n) for n in ("attn_norm", "wqkv", "wo", "ffn_norm", "wgate_up", "wdown")}
        spec = _KernelModel(self.embed.shape[1], self.hidden, len(self.blocks), self.heads, self.kv_heads,
                            self.head_dim, self.vocab_size, self.context, self.slots, self.eps,
                            ptr(self.embed), ptr(self.head), ptr(self.norm), ptr(self.cos), ptr(self.sin),
                            *[ctypes.cast(self._layer_pointers[n], ctypes.POINTER(_P))
                              for n in ("attn_norm", "wqkv", "wo", "ffn_norm", "wgate_up", "wdown")],
                            ptr(self.k_cache), ptr(self.v_cache))
        # prompts of up to one block of rows (those the C matmul reads each weight row once for) go
        # through the C step too (`prefill`): scratch for that many rows or `slots`, whichever is more
        self._kernel_rows = ctypes.c_int.in_dll(library, "row_block").value
        width = 3 * self.embed.shape[1] + self.q_size + 2 * self.kv_size + 3 * self.hidden  # floats per row
        self._scratch = torch.empty(max(self.slots, self._kernel_rows) * width + self.context)
        self._spec = spec
        self._greedy = library.decode_greedy
        self._greedy.restype = ctypes.c_int
        self._prefill = library.prefill
        self._prefill.restype = None
        return library.decode_step

    @property
    def uses_kernel(self) -> bool:
        return self._kernel is not None

    @property
    def vocab_size(self) -> int:
        return self.embed.shape[0]

    # -- the model ----------------------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | slice,
                 read: torch.Tensor | slice, kv_len: int, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Hidden states after the final norm for `tokens` [B, T] at `positions` [B, T], writing
        their keys and values into the cache `rows` and attending to the first `kv_len` positions of
        the cache rows `read` (the same rows; a slice where they are contiguous, which copies nothing).
        Few operations per block on purpose: each costs microseconds of dispatch at this size."""
        b, t = tokens.shape
        heads, kv_heads, hd, eps = self.heads, self.kv_heads, self.head_dim, self.eps
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[positions][:, :, None], self.sin[positions][:, :, None]  # [B, T, 1, hd]
        half = hd // 2
        gqa = kv_heads != heads
        for i, blk in enumerate(self.blocks):
            qkv = F.linear(F.rms_norm(x, blk.attn_norm.shape, blk.attn_norm, eps), blk.wqkv)
            qk = qkv[..., :self.q_size + self.kv_size].view(b, t, heads + kv_heads, hd)
            # RoPE on queries and keys at once, as transformers' apply_rotary_pos_emb
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            v = qkv[..., self.q_size + self.kv_size:].view(b, t, kv_heads, hd)
            kc, vc = self.k_cache[i], self.v_cache[i]  # [slots, context, kv_heads, hd]
            if t == 1 and not isinstance(rows, slice):  # one new token per row, each at its own position
                kc[rows, positions[:, 0]] = qk[:, 0, heads:]
                vc[rows, positions[:, 0]] = v[:, 0]
            else:  # a prompt, in one row, at positions 0..t-1
                kc[rows, :t] = qk[:, :, heads:]
                vc[rows, :t] = v
            y = F.scaled_dot_product_attention(
                qk[:, :, :heads].transpose(1, 2), kc[read, :kv_len].transpose(1, 2), vc[read, :kv_len].transpose(1, 2),
                attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=gqa)
            x = x + F.linear(y.transpose(1, 2).reshape(b, t, self.q_size), blk.wo)
            gate, up = F.linear(F.rms_norm(x, blk.ffn_norm.shape, blk.ffn_norm, eps), blk.wgate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, blk.wdown)
        return F.rms_norm(x, self.norm.shape, self.norm, eps)

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """Put a prompt into `slot` (replacing what was there); the next-token logits [vocab]."""
        if not 0 < len(ids) < self.context:
            raise UserError(f"prompt is {len(ids)} tokens; the model's context is {self.context}")
        n = len(ids)
        if self._kernel is not None and n <= self._kernel_rows:
            # a short prompt through the C step, its tokens as the rows of one pass: that costs about one
            # decode step (one read of the weights), where a PyTorch pass costs hundreds of microseconds
            # of dispatch (0.5 ms on nano: the time of a hundred of its tokens). Longer prompts go to
            # PyTorch, whose matrix products overtake the C loop somewhere past a few tens of tokens,
            # depending on the model and the machine.
            ints = lambda values: (ctypes.c_int * n)(*values)  # noqa: E731
            logits = torch.empty(self.vocab_size)
            self._prefill(ctypes.byref(self._spec), n, ints([slot] * n), ints(ids), ints(range(n)),
                          ctypes.c_void_p(logits.data_ptr()), ctypes.c_void_p(self._scratch.data_ptr()))
            self.lengths[slot] = n
            return logits
        tokens = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        rows = slice(slot, slot + 1)
        x = self._forward(tokens, positions, rows, rows, len(ids), None, causal=len(ids) > 1)
        self.lengths[slot] = len(ids)
        return F.linear(x[0, -1], self.head)

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Append one token to each slot and return the next-token logits [len(slots), vocab]: one
        batched step for all of them, whatever their lengths."""
        lengths = [self.lengths[s] for s in slots]
        if max(lengths) >= self.context:
            raise UserError(f"a sequence reached the model's context ({self.context} tokens)")
        if self._kernel is not None:
            n = len(slots)
            ints = lambda values: (ctypes.c_int * n)(*values)  # noqa: E731
            logits = torch.empty(n, self.vocab_size)
            self._kernel(ctypes.byref(self._spec), n, ints(slots), ints(tokens), ints(lengths),
                         ctypes.c_void_p(logits.data_ptr()), ctypes.c_void_p(self._scratch.data_ptr()))
            for s in slots:
                self.lengths[s] += 1
            return logits
        rows = torch.tensor(slots, device=self.device)
        positions = torch.tensor(lengths, device=self.device)[:, None]
        kv_len = max(lengths) + 1
        mask = None
        if min(lengths) != max(lengths):  # rows of different lengths: each sees its own positions only
            mask = (torch.arange(kv_len, device=self.device)[None] <= positions)[:, None, None]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        read = slice(slots[0], slots[0] + len(slots)) if contiguous else rows
        x = self._forward(torch.tensor(tokens, device=self.device)[:, None], positions, rows, read, kv_len, mask,
                          causal=False)
        for s in slots:
            self.lengths[s] += 1
        return F.linear(x[:, 0], self.head)


    @torch.inference_mode()
    def greedy(self, slot: int, token: int, n: int, eos: int | None) -> list[int]:
        """Append `token` to `slot` and decode up to `n` greedy tokens in one call into C (no Python per
        token), stopping after `eos`. Needs the C step (`uses_kernel`)."""
        pos = self.lengths[slot]
        n = min(n, self.context - pos)
        out = (ctypes.c_int * max(n, 1))()
        logits = torch.empty(self.vocab_size)
        made = self._greedy(ctypes.byref(self._spec), slot, token, pos, n, -1 if eos is None else eos, out,
                            ctypes.c_void_p(logits.data_ptr()), ctypes.c_void_p(self._scratch.data_ptr()))
        self.lengths[slot] += made
        return list(out[:made])


def _cache_arg() -> str:
    """What transformers calls the KV cache a forward takes and returns: `cache` from 5.x on (it removes
    `past_key_values` in 5.40), `past_key_values` in the 5.x releases before the rename."""
    from transformers import LlamaForCausalLM
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


CACHE_ARG = _cache_arg()


class TransformersEngine:
    """The slot interface of `DecodeEngine` over the model's own forward and transformers' KV cache,
    one sequence at a time (no batching): the reference engine `serve --engine hf` runs."""

    def __init__(self, model, slots: int = 1):
        self.model, self.slots = model, slots
        self.context = model.config.max_position_embeddings
        self.device = next(model.parameters()).device
        self.caches: dict[int, object] = {}
        self.lengths = [0] * slots

    def _step(self, slot: int, ids: list[int], cache) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, **{CACHE_ARG: cache})
        self.caches[slot] = out[CACHE_ARG]
        self.lengths[slot] += len(ids)
        return out.logits[0, -1]

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        if not 0 < len(ids) < self.context:
            raise UserError(f"prompt is {len(ids)} tokens; the model's context is {self.context}")
        self.lengths[slot] = 0
        return self._step(slot, ids, None)

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        return torch.stack([self._step(s, [t], self.caches[s]) for s, t in zip(slots, tokens)])


def make_engine(name: str, model, slots: int = 1):
    """The engine called `name` (one of ENGINES) over `model` with `slots` sequences."""
    if name not in ENGINES:
        raise unknown("engine", name, ENGINES)
    if engine_to_run(name, model) == "hf":
        return TransformersEngine(model, slots)
    return DecodeEngine(model, slots, kernel=name == "fast")


def _in_huge_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of CPU float32 `tensors`, side by side in one buffer advised for transparent huge pages
    (2 MB). A decode step streams every weight once per token, and with 4 KB pages the TLB misses
    cost about a quarter of it (measured on the small preset: 0.75× run.c's speed with 4 KB pages,
    1.0× with huge pages). Other devices and types: the tensors as they are."""
    if not tensors or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return tensors
    huge = 2 << 20
    total = sum(t.numel() for t in tensors)
    buffer = mmap.mmap(-1, total * 4 + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: no THP
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    start = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    flat = torch.frombuffer(buffer, dtype=torch.float32, count=total, offset=(-start) % huge)  # 2 MB aligned
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view(t.shape).copy_(t))
        offset += t.numel()
    return out


class Sampler:
    """The next token from logits, as transformers samples it: temperature, then top-k, then top-p
    (nucleus), from a generator of the request's own, so a seed gives the same tokens whatever else
    runs in the same batch. Temperature 0 is greedy."""

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(logits.argmax())
        logits = logits.float() / self.temperature
        if self.top_k and self.top_k < logits.numel():
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[-1] = False  # keep at least the most likely token
            logits = logits.masked_fill(drop.scatter(0, order, drop), -math.inf)
        # inverse CDF with one uniform draw: a tenth of torch.multinomial's time for one sample
        cumulative = logits.softmax(-1).cpu().cumsum(-1)
        u = torch.rand(1, generator=self.generator) * cumulative[-1]
        return min(int(torch.searchsorted(cumulative, u)), logits.numel() - 1)


BURST_SECONDS = 0.02  # one greedy sequence: tokens per call into C sized to take about this long


def run_batch(engine: DecodeEngine, ids: list[int], samplers: list[Sampler], max_new: int,
              eos: int | None):
    """Generate from one prompt in one slot per sampler (slots 0..n-1): yields, per step, a list of
    (row, token) for the rows still running; a row stops after `eos` or `max_new` tokens."""
    logits = engine.prefill(0, ids)
    for s in range(1, len(samplers)):  # the same prompt in the other slots: copy the cache row
        engine.k_cache[:, s, :len(ids)] = engine.k_cache[:, 0, :len(ids)]
        engine.v_cache[:, s, :len(ids)] = engine.v_cache[:, 0, :len(ids)]
        engine.lengths[s] = len(ids)
    picks = [(row, sampler(logits)) for row, sampler in enumerate(samplers)]
    made = 1
    if len(samplers) == 1 and samplers[0].temperature <= 0 and getattr(engine, "uses_kernel", False):
        # one greedy sequence: the C loop runs many tokens per call, in bursts of about BURST_SECONDS
        # (long enough that the Python between calls is noise, short enough to stream)
        yield picks
        token, size = picks[0][1], 16
        while token != eos and made < max_new:
            start = time.perf_counter()
            burst = engine.greedy(0, token, min(size, max_new - made), eos)
            if not burst:
                return
            elapsed = max(time.perf_counter() - start, 1e-6)
            size = max(1, min(4096, int(len(burst) * BURST_SECONDS / elapsed)))
            for t in burst:
                yield [(0, t)]
            made, token = made + len(burst), burst[-1]
        return
    while True:
        yield picks
        running = [(row, tok) for row, tok in picks if tok != eos]
        if not running or made >= max_new:
            return
        logits = engine.decode([row for row, _ in running], [tok for _, tok in running])
        picks = [(row, samplers[row](logits[i])) for i, (row, _) in enumerate(running)]
        made += 1
