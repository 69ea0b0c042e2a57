"""A domain added to a model of a real pretrained size (issue 19, item 5): a randomly initialised
Qwen2-shaped base of about 0.5B parameters (Qwen2.5-0.5B's shape: hidden 896, 24 blocks, 14 heads, 2
key-value heads, MLP 4,864, tied embedding of 151,936 rows, attention biases), saved by transformers
without expandlm's files (its context cut to 256 tokens, so that a CPU step takes seconds), grown with recipes by `expandlm adapt` and the default method (expand_branch,
frozen trunk, the branch's own tokenizer of `--branch-vocab` tokens). Measured: the adapt process's
peak memory (its resident set; on a GPU also the peak allocated GPU memory that `run.json` records),
training tokens/s, the folder sizes, and that the base domain
served through the grown folder gives the checkpoint's logits bit for bit. The weights are random:
storage, memory and speed do not depend on them; quality does, and is not measured here.

    python benchmarks/grow_at_scale.py                 # ~10 minutes on 2 CPU cores (8 steps of batch 2 × 256)
    python benchmarks/grow_at_scale.py --steps 50      # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from expandlm.atomic import write_json, write_text  # noqa: E402

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=256)


def make_base(folder: Path) -> int:
    """The random Qwen2-shaped checkpoint, with a byte-level BPE trained on the bundled corpora (its
    embedding padded beyond the tokenizer, as Qwen's is); its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from expandlm.data.corpus import default_data_dir, load_corpus
    from expandlm.data.tokenizer import train_bpe
    from expandlm.domains import get_domain
    texts = [d for name in ("stories", "code") for d in load_corpus(
        get_domain(name).data_file("train", default_data_dir()), get_domain(name), limit=400).documents]
    tok = train_bpe(texts, 8192, [])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_05B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20


def base_exact(base: Path, grown: Path) -> bool:
    import torch
    from transformers import AutoModelForCausalLM
    from expandlm.formats.served import load_served
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(base).eval()(input_ids=ids).logits
        served = load_served(grown, device="cpu")
        return torch.equal(served.for_domain("base")(input_ids=ids).logits, original)


def child_env() -> dict:
    """This environment, with the checkout first on the import path (the GPU check adds its wheels there)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--branch-vocab", type=int, default=8192)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-grow-at-scale")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "grow_at_scale")
    args = p.parse_args()
    import torch
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    params = make_base(args.work / "base")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "expandlm", "adapt", "--base", str(args.work / "base"), "--domain", "recipes",
                    "--out", str(args.work / "grown"), "--limit", "2000", "--val-limit", "20",
                    "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--eval-interval", "0",
                    "--no-progress", "--option", f"vocab_size={args.branch_vocab}"], check=True, cwd=ROOT,
                   env=child_env())
    record = json.loads((args.work / "grown" / "run.json").read_text())
    result = {"base_params": params, "command": "python benchmarks/grow_at_scale.py " + " ".join(sys.argv[1:]),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "adapt_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
              "adapt_peak_gpu_mib": record.get("peak_gpu_memory_mib"),
              "adapt_wall_s": round(time.perf_counter() - start, 1), "train_tokens": record["tokens"],
              "train_s": record["train_seconds"], "tokens_per_s": round(record["tokens"] / record["train_seconds"], 1),
              "trainable": record["trainable_params"], "total": record["total_params"],
              "base_mib": round(megabytes(args.work / "base"), 1), "grown_mib": round(megabytes(args.work / "grown"), 1),
              "recipes_bpb": record["bpb"]["recipes"], "base_exact": base_exact(args.work / "base", args.work / "grown")}
    write_json(args.out.with_suffix(".json"), result)
    table = "\n".join([
        f"Base: {params:,} parameters, Qwen2-shaped, random (fp32); recipes added with expand_branch "
        f"(frozen trunk, own tokenizer of {args.branch_vocab} tokens), {args.steps} steps of {args.batch_size} × 256 "
        f"tokens. Command: `{result['command']}`.", "",
        "| device | base folder | grown folder | trainable / total | adapt peak RSS | adapt peak GPU memory "
        "| train tokens/s | base domain exact |", "|---|---:|---:|---:|---:|---:|---:|---|",
        f"| {result['device']} | {result['base_mib']:,.0f} MiB | {result['grown_mib']:,.0f} MiB | {result['trainable']:,} / "
        f"{result['total']:,} | {result['adapt_peak_rss_mib']:,.0f} MiB | {result['adapt_peak_gpu_mib'] or '–'} "
        f"| {result['tokens_per_s']:,.0f} | {result['base_exact']} |"])
    write_text(args.out.with_suffix(".md"), "# A domain added to a 0.5B-parameter base\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
