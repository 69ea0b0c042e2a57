"""Single-stream decode speed: expandlm's engines against llama2.c's `run.c`, per preset, in one run.

For each preset it builds a model of that shape (random weights: speed does not depend on them; the
`<|eos|>` row of the tied embedding is zeroed so that no loop stops early), writes it in run.c's
format, builds `run.c` from `../shared/anchors/llama2.c/` with the system compiler into a temp dir
(MIT, unchanged, for measurement only), and measures greedy decoding of 255 tokens on one thread:

- hf: transformers' `model.generate` (its dynamic KV cache);
- torch: expandlm's engine with its PyTorch decode loop (`--engine torch`), one stream;
- fast: expandlm's engine with its C decode step (the default engine), one stream;
- fast xB: the same engine decoding B streams in one batched step (aggregate tokens/s);
- llama.cpp: llama.cpp's server (`xllamacpp`, if installed) on the GGUF file `expandlm export --format gguf`
  writes, by its own timer of the decoded tokens;
- run.c: llama2.c's loop (`-Ofast -march=native`, no OpenMP: one thread), by its own timer; where that
  millisecond timer cannot time a run (nano: 127 tokens in about a millisecond), by the wall time of
  whole runs of 255 tokens less that of runs of one token (best of 30 each).

The loops run in turns, A B C A B C (`--repeats` rounds), and each reports the **median** of its rounds
beside its **CPU time per token** (the process's, or run.c's as a child's, over the same tokens): a loop
slowed by a busy machine loses wall time, not CPU time, so the two together tell a slow loop from a busy
machine. The load average is recorded before and after each round. run.c's greedy tokens are read back
from its output and compared with the engine's (a check of the export).

`--models FOLDER ...` measures trained checkpoints instead of (or beside) the presets' random ones, e.g.
the demo's stories expert.

    python benchmarks/decode_speed.py                        # nano..base, ~3 minutes on 2 cores
    python benchmarks/decode_speed.py --presets tiny --repeats 5 --models runs/demo/stories
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from expandlm.atomic import write_json, write_text  # noqa: E402
from expandlm.inference.engine import DecodeEngine, Sampler, run_batch  # noqa: E402
from expandlm.formats.gguf import meta_rotary, write_gguf  # noqa: E402
from expandlm.model.llama import get_preset, llama_config  # noqa: E402
from expandlm.studies.report import markdown_table  # noqa: E402
from expandlm.run_folder import versions  # noqa: E402
from expandlm.data.tokenizer import train_bpe  # noqa: E402

RUN_C = ROOT.parent / "shared" / "anchors" / "llama2.c" / "run.c"
CFLAGS = ["-Ofast", "-march=native"]
START = 1  # run.c starts every sequence from token 1 (its BOS); so do the other loops here


def bench_tokenizer():
    """A small byte-level BPE (GGUF needs merges); the model's vocabulary is padded to the preset's."""
    return train_bpe(["Once upon a time, there was a little cat named Tom. He liked to play in the sun."] * 20, 300)


def trained_model(folder: str):
    """A trained Llama checkpoint (an expandlm expert, or any transformers folder) and its tokenizer, with
    the `<|eos|>` row zeroed as in `bench_model` so that every loop decodes the same number of tokens."""
    from transformers import AutoTokenizer
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        model.get_output_embeddings().weight[model.config.eos_token_id] = 0
    return model, tokenizer


def bench_model(preset_name: str, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    preset = get_preset(preset_name)
    config = llama_config(preset, tokenizer)
    config.vocab_size = preset.vocab
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # far-apart logits: greedy tokens decided by the model, not rounding
            if p.dim() == 2:
                p.mul_(8)
        model.model.embed_tokens.weight[config.eos_token_id] = 0  # nothing stops early
    return model


# -- llama2.c's formats (its README) -----------------------------------------------------------------

def write_llama2c(model: LlamaForCausalLM, path: Path) -> None:
    cfg, layers = model.config, model.model.layers
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    header = struct.pack("7i", cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                         cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size,  # > 0: shared head
                         cfg.max_position_embeddings)
    tensors = [model.model.embed_tokens.weight,
               *[b.input_layernorm.weight for b in layers],
               *[meta_rotary(b.self_attn.q_proj.weight, cfg.num_attention_heads) for b in layers],
               *[meta_rotary(b.self_attn.k_proj.weight, cfg.num_key_value_heads) for b in layers],
               *[b.self_attn.v_proj.weight for b in layers],
               *[b.self_attn.o_proj.weight for b in layers],
               *[b.post_attention_layernorm.weight for b in layers],
               *[b.mlp.gate_proj.weight for b in layers],   # w1
               *[b.mlp.down_proj.weight for b in layers],   # w2
               *[b.mlp.up_proj.weight for b in layers],     # w3
               model.model.norm.weight,
               torch.zeros(2, cfg.max_position_embeddings, head_dim // 2)]  # RoPE tables: run.c skips them
    with open(path, "wb") as f:
        f.write(header)
        for t in tensors:
            f.write(t.detach().float().contiguous().numpy().tobytes())


def write_llama2c_tokenizer(vocab_size: int, path: Path) -> None:
    """Token i is the text "[i]", so run.c's output reads back as token ids."""
    pieces = [f"[{i}]".encode() for i in range(vocab_size)]
    with open(path, "wb") as f:
        f.write(struct.pack("I", max(len(p) for p in pieces)))
        for p in pieces:
            f.write(struct.pack("fI", 0.0, len(p)) + p)


def build_run_c(tmp: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not RUN_C.exists():
        raise SystemExit(f"need a C compiler and {RUN_C}")
    exe = tmp / "run"
    subprocess.run([cc, *CFLAGS, "-o", str(exe), str(RUN_C), "-lm"], check=True)
    return exe


TIMER_FLOOR_S = 0.05  # run.c times itself in whole milliseconds: below this its own figure is mostly rounding


def _run_c(exe: Path, model_bin: Path, tok_bin: Path, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), str(model_bin), "-z", str(tok_bin), "-t", "0", "-n", str(steps)],
                          capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_c(exe: Path, model_bin: Path, tok_bin: Path, steps: int) -> tuple[float, list[int]]:
    """run.c's own tok/s; where its millisecond timer cannot time the run (nano), the wall-clock figure."""
    out = _run_c(exe, model_bin, tok_bin, steps)
    speed = float(re.search(r"achieved tok/s: ([\d.]+|inf)", out.stderr).group(1))
    if (steps - 1) / speed < TIMER_FLOOR_S:
        speed = run_c_by_wall(exe, model_bin, tok_bin, steps)
    return speed, [int(t) for t in re.findall(r"\[(\d+)\]", out.stdout)][:steps]  # -n N: N forward passes


def run_c_by_wall(exe: Path, model_bin: Path, tok_bin: Path, steps: int, runs: int = 30) -> float:
    """run.c's tok/s from whole runs: the best wall time of `runs` runs of `steps` tokens, less the best of
    `runs` runs of one token (the same start-up, load and first pass), over the `steps - 1` tokens between."""
    def best(n: int) -> float:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            _run_c(exe, model_bin, tok_bin, n)
            times.append(time.perf_counter() - t0)
        return min(times)
    return (steps - 1) / max(best(steps) - best(1), 1e-9)


# -- the loops ---------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    """CPU time of this process (all its threads: llama.cpp's server runs in one) and of its waited-for
    children (run.c)."""
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + child.ru_utime + child.ru_stime


def hf_generate(model, n: int) -> tuple[float, list[int]]:
    ids = torch.tensor([[START]])
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return n / (time.perf_counter() - t0), out[0, 1:].tolist()


def engine_greedy(engine: DecodeEngine, n: int, streams: int = 1) -> tuple[float, list[int]]:
    """tokens/s over all streams, and the first stream's tokens: one stream as `generate` runs it
    (`run_batch`), several in batched steps as `serve` runs them."""
    t0 = time.perf_counter()
    if streams == 1:
        tokens = [t for step in run_batch(engine, [START], [Sampler()], n, None) for _, t in step]
        return n / (time.perf_counter() - t0), tokens
    logits = engine.prefill(0, [START])
    for s in range(1, streams):
        logits = engine.prefill(s, [START])
    tokens = [[int(logits.argmax())] for _ in range(streams)]
    slots = list(range(streams))
    while len(tokens[0]) < n:
        logits = engine.decode(slots, [t[-1] for t in tokens])
        for s in slots:
            tokens[s].append(int(logits[s].argmax()))
    return streams * n / (time.perf_counter() - t0), tokens[0]


def llama_cpp_greedy(path: Path, context: int, n: int) -> tuple[float, list[int]]:
    """llama.cpp's server (one thread, float32 KV cache, as the GGUF test runs it), by its own decode timer."""
    from tests.test_formats_gguf import LlamaServer
    server = LlamaServer(path, context)
    try:
        answer = server.completion([START], n)
    finally:
        server.close()
    return answer["timings"]["predicted_per_second"], answer["tokens"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["nano", "tiny", "small", "base"])
    p.add_argument("--tokens", type=int, default=255, help="greedy tokens per stream")
    p.add_argument("--repeats", type=int, default=5, help="rounds of every loop in turns; the median counts")
    p.add_argument("--models", nargs="*", default=[], help="trained Llama checkpoint folders to measure too")
    p.add_argument("--batch", type=int, default=8, help="streams of the batched run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    torch.set_num_threads(1)
    try:
        import xllamacpp  # noqa: F401
        have_llama_cpp = True
    except ImportError:
        have_llama_cpp = False
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exe = build_run_c(tmp)
        tokenizer = bench_tokenizer()
        subjects = [(name, lambda name=name: (bench_model(name, tokenizer), tokenizer)) for name in args.presets]
        subjects += [(Path(folder).name, lambda folder=folder: trained_model(folder)) for folder in args.models]
        for name, load in subjects:
            model, model_tokenizer = load()
            n = min(args.tokens, model.config.max_position_embeddings - 1)
            write_llama2c(model, tmp / "model.bin")
            write_llama2c_tokenizer(model.config.vocab_size, tmp / "tokenizer.bin")
            gguf = None
            if have_llama_cpp:
                gguf = tmp / f"{name}.gguf"
                write_gguf(model, model_tokenizer, gguf, vocab_size=model.config.vocab_size)
            single, batched = DecodeEngine(model), DecodeEngine(model, slots=args.batch)
            torch_loop = DecodeEngine(model, kernel=False)
            assert single.uses_kernel, "the C decode step did not build (see the warning above)"
            speeds, cpu_per_token, tokens, loads = {}, {}, {}, [os.getloadavg()[0]]
            loops = {"hf": lambda: hf_generate(model, n), "torch": lambda: engine_greedy(torch_loop, n),
                     "fast": lambda: engine_greedy(single, n),
                     f"fast x{args.batch}": lambda: engine_greedy(batched, n, args.batch),
                     "run.c": lambda: run_c(exe, tmp / "model.bin", tmp / "tokenizer.bin", n)}
            if gguf:
                loops["llama.cpp"] = lambda: llama_cpp_greedy(gguf, model.config.max_position_embeddings, n)
            engine_greedy(single, 8)  # warm-up
            for _ in range(args.repeats):
                for loop, run in loops.items():
                    cpu0 = cpu_seconds()
                    speed, toks = run()
                    streams = args.batch if loop.startswith("fast x") else 1
                    speeds.setdefault(loop, []).append(speed)
                    cpu_per_token.setdefault(loop, []).append((cpu_seconds() - cpu0) / (streams * n))
                    tokens[loop] = toks
                loads.append(os.getloadavg()[0])
            median = {k: statistics.median(v) for k, v in speeds.items()}
            row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "tokens": n,
                   **{f"{k} tok/s": round(v, 1) for k, v in median.items()},
                   "fast / run.c": round(median["fast"] / median["run.c"], 2),
                   f"fast x{args.batch} / run.c": round(median[f"fast x{args.batch}"] / median["run.c"], 2),
                   "hf / run.c": round(median["hf"] / median["run.c"], 2),
                   **({"fast / llama.cpp": round(median["fast"] / median["llama.cpp"], 2)} if gguf else {}),
                   # wall against CPU time per token: equal on an idle core, wall the larger where the machine is busy
                   "fast wall ms/token": round(1e3 / median["fast"], 4),
                   "fast CPU ms/token": round(1e3 * statistics.median(cpu_per_token["fast"]), 4),
                   "load": f"{min(loads):.1f}–{max(loads):.1f}",
                   "same tokens as hf": {k: v == tokens["hf"] for k, v in tokens.items() if k != "hf"},
                   "rounds": {k: [round(x, 1) for x in v] for k, v in speeds.items()},
                   # run.c's and llama.cpp's include their start-up (a process, a server) in each round
                   "cpu_ms_per_token": {k: [round(1e3 * x, 4) for x in v] for k, v in cpu_per_token.items()}}
            results.append(row)
            print(row, flush=True)
    out = Path(args.out)
    meta = {"threads": 1, "cflags": CFLAGS, "repeats": args.repeats, "statistic": "median of interleaved rounds",
            "cpu": os.cpu_count(),
            "load_average_at_end": os.getloadavg(), "versions": versions()}
    write_json(out / "decode_speed.json", {"meta": meta, "results": results})
    columns = [k for k in results[0] if k not in ("same tokens as hf", "rounds", "cpu_ms_per_token")]
    table = markdown_table(results, columns)
    write_text(out / "decode_speed.md", f"# Decode speed, one thread, greedy\n\n`{' '.join(sys.argv)}`: medians of {args.repeats} interleaved rounds; "
               f"CPU ms/token is the process's CPU time per decoded token; load: the 1-minute load average over the "
               f"rounds.\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
