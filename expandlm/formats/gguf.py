"""GGUF export: one domain's model as a file llama.cpp runs (`expandlm export ... --format gguf`), written
with the `gguf` package (llama.cpp's own writer).

The model is llama.cpp's `llama` architecture, its matrices in `dtype` (f32, f16, bf16 or q8_0, through the
`gguf` package's own quantizers, as llama.cpp's converter writes them; norms stay f32): the tied head is left
out, and llama.cpp then uses `token_embd` for the output as well. wq and wk go in Meta's rotary layout (llama.cpp's
converter does the same permutation). The byte-level BPE tokenizer becomes a `gpt2` vocabulary with
its merges, pre-tokenizer `gpt-2` (the GPT-2 split regex, which is the one `tokenizers`' ByteLevel
pre-tokenizer applies), the special tokens as control tokens, and no BOS added by llama.cpp: a request
starts with `<|bos|><|domain|>`, given as token ids like every other expandlm request. A plain domain
(a pretrained model's own) starts as its tokenizer starts a text, so llama.cpp adds the BOS where the
tokenizer does. llama.cpp ends generation at the EOS; it warns on
loading that "special_eos_id is not in special_eog_ids" because it picks its end-of-generation tokens by
their text (`<|endoftext|>`, `<|im_end|>`, ...; no GGUF key sets them), and `<|eos|>` is not among them.

    write_gguf(model, tokenizer, "recipes.q8_0.gguf", dtype="q8_0")
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..data.tokenizer import start_tokens
from ..errors import UserError
from ..model.blocks import decoder_blocks, final_norm

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")  # what --dtype writes the matrices in
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for the GPT-2 regex split (llama-vocab.cpp)
EXPORTED_BY = "expandlm.exported_from"


def _check_replaceable(out: Path) -> None:
    """An existing file is replaced only if expandlm wrote it (a GGUF with its mark)."""
    if not out.exists():
        return
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --format gguf writes one file: name it, e.g. {out / 'model.gguf'}")
    import gguf
    try:
        ours = gguf.GGUFReader(str(out)).get_field(EXPORTED_BY) is not None
    except Exception:  # not a GGUF file at all
        ours = False
    if not ours:
        raise UserError(f"{out}: exists and expandlm did not write it; expandlm never replaces such a file: "
                        "choose another --out")


def meta_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's Llama wq/wk (each head's rotary pairs split in two halves) in Meta's layout
    (pairs interleaved), which llama.cpp and llama2.c rotate."""
    out, inp = w.shape
    return w.view(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings by id, their GGUF types, and the BPE merges."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel":
        raise UserError("GGUF export needs a byte-level BPE tokenizer (the ones expandlm trains)")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:  # embedding rows beyond the tokenizer (a padded vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    if not merges:  # GGUF cannot hold an empty array, and llama.cpp's gpt2 vocabulary requires the merges
        raise UserError("GGUF export needs a BPE tokenizer with merges; this one has no merges (the 'bytes' "
                        "baseline?)")
    return tokens, types, merges


def write_gguf(model, tokenizer, out: str | os.PathLike, name: str = "expandlm", vocab_size: int | None = None,
               plain: bool = False, dtype: str = "f32") -> None:
    """`model` (a standard LlamaForCausalLM: what `ServedModel.export` gives) and its tokenizer as one
    GGUF file, its matrices in `dtype`, written atomically. `plain`: the model's domain has no tag (see the module)."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype!r}: a GGUF file is written in one of {', '.join(GGUF_DTYPES)}")
    qtype = gguf.GGMLQuantizationType[dtype.upper()]

    cfg = model.config
    if cfg.model_type != "llama":
        raise UserError(f"GGUF export supports Llama models, not {cfg.model_type!r} ({type(model).__name__}); "
                        "export it with --format checkpoint")
    rope = (getattr(cfg, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"GGUF export supports plain RoPE, not {rope.get('rope_type')!r}")
    vocab_size = vocab_size or cfg.vocab_size
    vocabulary = _vocabulary(tokenizer, vocab_size)  # a tokenizer it cannot hold is refused before the file is begun
    _check_replaceable(Path(out))
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name)
        w.add_string(EXPORTED_BY, name)  # the mark of a file expandlm may replace (llama.cpp ignores unknown keys)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType[f"MOSTLY_{dtype.upper()}"])
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
        w.add_vocab_size(vocab_size)
        _write_vocabulary(w, tokenizer, vocabulary, plain)
        _write_tensors(w, model, heads, kv_heads, qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def _write_vocabulary(w, tokenizer, vocabulary: tuple[list[str], list[int], list[str]], plain: bool) -> None:
    tokens, types, merges = vocabulary
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add_id, token_id in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                             (w.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:  # a pretrained tokenizer may lack one (Qwen2's has no BOS or pad)
            add_id(token_id)
    w.add_add_bos_token(plain and start_tokens(tokenizer) == [tokenizer.bos_token_id])
    w.add_add_eos_token(False)


def _write_tensors(w, model, heads: int, kv_heads: int, qtype) -> None:
    import gguf
    import numpy as np

    def add(name_, tensor):
        data = tensor.detach().float().cpu().contiguous().numpy()
        kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms stay f32, as llama.cpp keeps them
        if kind == gguf.GGMLQuantizationType.F32:
            return w.add_tensor(name_, data)
        try:
            packed = gguf.quants.quantize(data, kind)
        except gguf.quants.QuantError:  # rows not a whole number of q8_0's 32-value blocks: f16, as llama.cpp does
            kind, packed = gguf.GGMLQuantizationType.F16, data.astype(np.float16)
        w.add_tensor(name_, packed, raw_dtype=kind)  # the writer reads a packed (uint8) array's shape as bytes

    embedding = model.get_input_embeddings().weight
    add("token_embd.weight", embedding)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embedding:
        add("output.weight", head.weight)  # an untied head; tied: llama.cpp reuses token_embd
    for i, b in enumerate(decoder_blocks(model)[0]):
        add(f"blk.{i}.attn_norm.weight", b.input_layernorm.weight)
        add(f"blk.{i}.attn_q.weight", meta_rotary(b.self_attn.q_proj.weight, heads))
        add(f"blk.{i}.attn_k.weight", meta_rotary(b.self_attn.k_proj.weight, kv_heads))
        add(f"blk.{i}.attn_v.weight", b.self_attn.v_proj.weight)
        add(f"blk.{i}.attn_output.weight", b.self_attn.o_proj.weight)
        add(f"blk.{i}.ffn_norm.weight", b.post_attention_layernorm.weight)
        add(f"blk.{i}.ffn_gate.weight", b.mlp.gate_proj.weight)
        add(f"blk.{i}.ffn_up.weight", b.mlp.up_proj.weight)
        add(f"blk.{i}.ffn_down.weight", b.mlp.down_proj.weight)
    add("output_norm.weight", final_norm(model).weight)
