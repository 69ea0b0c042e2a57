"""Training throughput and MFU of the tiny and small presets, on the GPU where there is one, else the CPU.

For each preset it measures, in one process and on the same real batches:
- expandlm: tokens/s of `expandlm.training.loop.train` (accelerate, AdamW, clipping, LR schedule, logging);
- plain: tokens/s of a bare PyTorch loop over the same model (forward, loss, backward, clip, AdamW);
- the FLOP/s a large `torch.mm` reaches here in the training precision (what `--precision auto` picks on
  this machine: bf16 on a GPU and on a CPU with fast bf16 matmuls, else fp32; both loops compute in it),
  measured again in every repeat, and MFU = model FLOP/s / the peak of the same repeat.
The repeats alternate the two loops; the medians are reported, every repeat is in the JSON.
Model FLOPs per token = 6 × parameters + 12 × layers × dim × context (the attention scores).

    python benchmarks/train_throughput.py                  # tiny and small, ~8 minutes on 2 cores
    python benchmarks/train_throughput.py --presets tiny --steps 10 --precision no   # fp32 whatever the CPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from expandlm.atomic import write_json  # noqa: E402
from expandlm.run_folder import RunFolder, versions  # noqa: E402
from expandlm.data.corpus import default_data_dir, load_corpus  # noqa: E402
from expandlm.domains import get_domain  # noqa: E402
from expandlm.model.llama import build_model, count_params, get_preset  # noqa: E402
from expandlm.studies.report import markdown_table  # noqa: E402
from expandlm.data.shards import PackedBatches, build_shard  # noqa: E402
from expandlm.data.tokenizer import train_bpe  # noqa: E402
from expandlm.training.loop import TrainConfig, causal_lm_loss, make_optimizer, resolved_precision, train  # noqa: E402,E501


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, bf16: bool, n: int = 2048, repeats: int = 10) -> float:
    """Best FLOP/s of an n×n×n matmul in the precision training computes in: what the hardware gives a
    large, easy GEMM."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(10 if device.type == "cuda" else 1):  # a GPU matmul of 2048³ takes microseconds
            torch.mm(a, b)
        _sync(device)
        best = max(best, (10 if device.type == "cuda" else 1) * 2 * n**3 / (time.perf_counter() - t0))
    return best


def plain_loop(model, batches, cfg: TrainConfig, steps: int, warmup: int, device: torch.device) -> float:
    """The reference: a bare PyTorch training loop, no framework around it (bf16 autocast where expandlm's
    loop computes in it)."""
    model = model.to(device)
    if cfg.compile:
        model = torch.compile(model)
    opt = make_optimizer(model, cfg)
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = causal_lm_loss(model, batches.batch(step).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return steps * batches.batch_size * batches.context / (time.perf_counter() - t0)


def expandlm_loop(model, batches, cfg: TrainConfig, steps: int, warmup: int) -> float:
    """tokens/s of expandlm's own loop, from its metrics (the warm-up window excluded)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(**{**cfg.__dict__, "max_steps": warmup + steps, "log_interval": warmup,
                             "eval_interval": 0, "checkpoint_interval": 10**9, "progress": False})
        assert steps % warmup == 0, "steps must be a multiple of warmup (the log window)"
        train(model, batches, Path(out), cfg)
        windows = [r for r in RunFolder(Path(out)).metrics() if "loss" in r][1:]
    tokens_per_window = warmup * batches.batch_size * batches.context
    seconds = sum(tokens_per_window / r["tokens_per_s"] for r in windows)
    return len(windows) * tokens_per_window / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "small"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per loop (a multiple of --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="runs of each loop, alternating; the median counts")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    p.add_argument("--precision", choices=("auto", "no", "bf16"), default="auto",
                   help="what both loops compute in (auto: what a run here picks)")
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    data_dir = default_data_dir()
    corpus = load_corpus(data_dir / "tinystories.jsonl.gz", get_domain("stories"), limit=3000)
    precision = resolved_precision(TrainConfig(precision=args.precision))  # both loops compute in it
    rows, repeats = [], []
    for name in args.presets:
        preset = get_preset(name)
        tok = train_bpe(corpus.documents, preset.vocab)
        with tempfile.TemporaryDirectory() as cache:
            shard = build_shard(corpus, tok, cache)
            batches = PackedBatches([shard], preset.context, args.batch_size, seed=0)
            cfg = TrainConfig(batch_size=args.batch_size, compile=args.compile, precision=precision)
            n_params = count_params(build_model(preset, tok))
            flops_per_token = 6 * n_params + 12 * preset.layers * preset.dim * preset.context
            plain, ours, peaks = [], [], []
            for _ in range(args.repeats):  # the two loops in turns, and the peak each time: a load that comes
                # and goes moves all three together, so the ratio and MFU of one repeat compare like with like
                peaks.append(matmul_flops(device, precision == "bf16"))
                plain.append(plain_loop(build_model(preset, tok), batches, cfg, args.steps, args.warmup, device))
                ours.append(expandlm_loop(build_model(preset, tok), batches, cfg, args.steps, args.warmup))
        mfu = [o * flops_per_token / peak for o, peak in zip(ours, peaks)]
        row = {"preset": name, "device": device.type, "precision": precision, "params": n_params,
               "batch_tokens": args.batch_size * preset.context, "plain_tok_s": round(statistics.median(plain)),
               "expandlm_tok_s": round(statistics.median(ours)),
               "ratio": round(statistics.median(o / p for o, p in zip(ours, plain)), 3),
               "model_gflop_s": round(statistics.median(ours) * flops_per_token / 1e9, 1),
               "matmul_gflop_s": round(statistics.median(peaks) / 1e9, 1), "mfu": round(statistics.median(mfu), 3),
               "load": f"{os.getloadavg()[0]:.1f}"}
        repeats.append({"preset": name, "plain_tok_s": plain, "expandlm_tok_s": ours, "matmul_flop_s": peaks, "mfu": mfu})
        rows.append(row)
        print(markdown_table([row], list(row)), flush=True)
    print("\n" + markdown_table(rows, list(rows[0])))
    write_json(args.out, {"rows": rows, "repeats": repeats, "threads": torch.get_num_threads(), "versions": versions(),
                                 "args": vars(args)})
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
