"""expand_branch on a pretrained base: should the new domain get its own tokenizer, or keep the base's?
(issue 19, item 2; the `tokenizer` option of expand_branch).

Two stand-ins for a pretrained model, each trained here with the CLI (tiny preset) and then saved as a
plain transformers checkpoint (`save_pretrained` of the model and its tokenizer: no expandlm.json, no
run.json), so `adapt` treats it as a foreign checkpoint whose own behaviour is the plain domain `base`:

- narrow: a stories expert with its own stories BPE (what issue 19 item 5 calls the quality question);
- broad: a model trained on stories and Python code, one stream, whose BPE was trained on stories,
  recipes and code mixed: a broad vocabulary that covers recipe words the model never read.

Each base then grows `recipes` with expand_branch at one budget (steps x batch x context, the same for
every run), `tokenizer=own` against `tokenizer=base`, per seed; a recipes scratch expert at the same budget
is the reference. Reported: recipes validation bpb (bits per byte: comparable across tokenizers), the
tokens and the bytes of recipe text each run saw, bytes/token of each tokenizer on the recipes
validation text, and whether the base domain of every grown folder still gives the checkpoint's logits
bit for bit.

    python benchmarks/pretrained_tokenizer.py                       # ~35 min on 2 CPU cores; resumable
    python benchmarks/pretrained_tokenizer.py --seeds 0 --steps 30  # a quicker look

Every stage is a run folder under --out: a finished one is reused, an interrupted one resumed.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
BATCH = 32
BASE_TOKENS = 1_000_000  # each base's training budget (half the studies' stories expert's: 2 shared cores)
TOKENIZERS = ("own", "base")
BROAD_SPEC = """\
# stories and Python code in one stream: a stand-in for a broad pretraining mix (no recipes in it)
name: broad
description: children's stories and Python functions, mixed
text: {field: text}
"""


def expandlm(*argv) -> None:
    """One CLI command, in its own process (its threads and memory end with it)."""
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT)}
    quiet = ["--no-progress"] if argv[0] in ("train", "adapt") else []
    subprocess.run([sys.executable, "-m", "expandlm", *map(str, argv), *quiet], check=True, env=env)


def run_stage(command: str, out: Path, *argv) -> Path:
    """`expandlm COMMAND ... --out OUT`: skipped when done, resumed when interrupted."""
    from expandlm.run_folder import RunFolder
    state = RunFolder(out).auto()
    if state != "done":
        print(f"== {command} → {out} ({state})", flush=True)
        expandlm(command, *argv, "--out", out, *(["--resume"] if state == "resume" else []))
    return out


def texts(path: Path, domain: str) -> list[str]:
    from expandlm.data.corpus import load_corpus
    from expandlm.domains import get_domain
    return load_corpus(str(path), get_domain(domain)).documents


def write_texts(path: Path, documents: list[str]) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with gzip.open(tmp, "wt") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in documents)
        tmp.rename(path)
    return path


def broad_data(out: Path) -> dict[str, Path]:
    """The broad base's files: its domain spec, its training and validation streams (stories + code,
    shuffled), and its tokenizer's corpus (stories + recipes + code)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "broad.yaml").write_text(BROAD_SPEC)
    files = {"spec": out / "broad.yaml"}
    for split, suffix in (("train", ""), ("valid", ".valid")):
        stream = texts(DATA / f"tinystories{suffix}.jsonl.gz", "stories") + texts(DATA / f"code{suffix}.jsonl.gz", "code")
        random.Random(0).shuffle(stream)
        files[split] = write_texts(out / f"stories+code{suffix}.jsonl.gz", stream)
    mixed = (texts(DATA / "tinystories.jsonl.gz", "stories") + texts(DATA / "recipes.jsonl.gz", "recipes")
             + texts(DATA / "code.jsonl.gz", "code"))
    random.Random(0).shuffle(mixed)
    files["tokenizer"] = write_texts(out / "stories+recipes+code.jsonl.gz", mixed)
    return files


def plain_checkpoint(run: Path, out: Path) -> Path:
    """The trained model and its tokenizer as transformers saves them: nothing of expandlm's beside."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if not (out / "config.json").exists():
        AutoModelForCausalLM.from_pretrained(run).save_pretrained(out)
        AutoTokenizer.from_pretrained(run).save_pretrained(out)
    assert not (out / "expandlm.json").exists() and not (out / "run.json").exists()
    return out


def make_bases(out: Path) -> dict[str, Path]:
    files = broad_data(out / "data")
    budget = ["--preset", "tiny", "--max-tokens", BASE_TOKENS, "--batch-size", BATCH, "--eval-interval", 0]
    narrow = run_stage("train", out / "narrow-run", "--domain", "stories", "--data", DATA / "tinystories.jsonl.gz",
                       "--val-data", DATA / "tinystories.valid.jsonl.gz", *budget)
    tok = out / "broad-tokenizer"
    if not (tok / "tokenizer.json").exists():
        expandlm("tokenizer", "--domain", files["spec"], "--data", files["tokenizer"], "--vocab-size", 2048,
                 "--out", tok)
    broad = run_stage("train", out / "broad-run", "--domain", files["spec"], "--data", files["train"],
                      "--val-data", files["valid"], "--tokenizer", tok, *budget)
    return {"narrow": plain_checkpoint(narrow, out / "narrow"), "broad": plain_checkpoint(broad, out / "broad")}


def recipes_budget(steps: int, seed: int) -> list:
    return ["--data", DATA / "recipes.jsonl.gz", "--val-data", DATA / "recipes.valid.jsonl.gz", "--max-steps", steps,
            "--batch-size", BATCH, "--eval-interval", 0, "--seed", seed]


def base_is_exact(base: Path, grown: Path) -> bool:
    """The grown folder's `base` domain gives the checkpoint's own logits, bit for bit, on stories text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from expandlm.formats.served import load_served
    tok = AutoTokenizer.from_pretrained(base)
    original, served = AutoModelForCausalLM.from_pretrained(base).eval(), load_served(grown, device="cpu")
    for text in texts(DATA / "tinystories.valid.jsonl.gz", "stories")[:8]:
        ids = torch.tensor([tok(text)["input_ids"][:256]])
        with torch.no_grad():
            if not torch.equal(served.for_domain("base")(input_ids=ids).logits, original(input_ids=ids).logits):
                return False
    return True


def recipe_rates(tokenizer_folder: Path) -> tuple[float, float]:
    """(bytes/token of the recipes validation text, bytes per training-stream token of the recipes
    training set: its text over its tokens with each document's two prefix tokens and EOS)."""
    from expandlm.data.tokenizer import encode_texts, load_tokenizer
    tok = load_tokenizer(tokenizer_folder)
    rates = []
    for name, extra in (("recipes.valid", 0), ("recipes", 3)):
        docs = texts(DATA / f"{name}.jsonl.gz", "recipes")
        tokens = sum(len(ids) + extra for ids in encode_texts(tok, docs))
        rates.append(sum(len(d.encode()) for d in docs) / tokens)
    return rates[0], rates[1]


def measure(out: Path, bases: dict[str, Path], steps: int, seeds: list[int]) -> list[dict]:
    rows = []
    for seed in seeds:
        folder = run_stage("train", out / f"recipes-scratch-s{seed}", "--domain", "recipes", "--preset", "tiny",
                           *recipes_budget(steps, seed))
        rows.append(row(folder, "none (recipes scratch expert)", "own", seed, None))
        for name, base in bases.items():
            for tokenizer in TOKENIZERS:
                folder = run_stage("adapt", out / f"{name}+recipes-{tokenizer}-s{seed}", "--base", base,
                                   "--domain", "recipes", "--option", f"tokenizer={tokenizer}",
                                   *recipes_budget(steps, seed))
                rows.append(row(folder, name, tokenizer, seed, base))
    return rows


def row(folder: Path, base: str, tokenizer: str, seed: int, base_folder: Path | None) -> dict:
    record = json.loads((folder / "run.json").read_text())
    assert base_folder is None or record["card"]["tokenizer"] == tokenizer, folder  # what the option asked
    per_token, per_stream_token = recipe_rates(folder)
    return {"base": base, "tokenizer": tokenizer, "seed": seed, "bpb": record["bpb"]["recipes"],
            "tokens": record["tokens"], "bytes_seen": round(record["tokens"] * per_stream_token),
            "bytes_per_token": per_token, "vocab": len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]),
            "trainable": record["trainable_params"], "seconds": record["train_seconds"],
            "trunk": (record.get("card") or {}).get("trunk"),
            "base_exact": base_is_exact(base_folder, folder) if base_folder else None}


def describe_bases(out: Path, bases: dict[str, Path]) -> list[str]:
    """One line per base: what it was trained on, its validation bpb, its tokenizer on recipes."""
    lines = []
    for name, folder in bases.items():
        record = json.loads((out / f"{name}-run" / "run.json").read_text())
        (domain, bpb), = record["bpb"].items()
        trained_on = "stories" if domain == "stories" else "stories + code (one shuffled stream)"
        lines.append(f"- {name}: trained on {trained_on}, {record['tokens']:,} tokens, {bpb:.3f} bpb on its own "
                     f"validation text; its tokenizer packs {recipe_rates(folder)[0]:.3f} bytes/token of recipes")
    return lines


def write_report(out: Path, rows: list[dict], steps: int, bases: list[str], report: Path) -> None:
    scratch = {r["seed"]: r["bpb"] for r in rows if r["base_exact"] is None}
    lines = ["# expand_branch on a pretrained base: own tokenizer or the base's", "",
             f"`python benchmarks/pretrained_tokenizer.py` (tiny preset; {steps} steps x {BATCH} x 256 tokens of "
             f"recipes per run; lr and every other setting the defaults; runs in `{out.relative_to(ROOT)}`). "
             "The bases, saved as plain transformers checkpoints:", "", *bases, "",
             "| base | tokenizer | seed | recipes bpb | gap vs scratch | tokens seen | recipe bytes seen | "
             "bytes/token (recipes val) | vocab | trainable | trunk | base exact | train s (shared cores) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = f"{r['bpb'] / scratch[r['seed']] - 1:+.1%}"
        exact = {True: "yes", False: "**NO**", None: "–"}[r["base_exact"]]
        lines.append(f"| {r['base']} | {r['tokenizer']} | {r['seed']} | {r['bpb']:.4f} | {gap} | {r['tokens']:,} | "
                     f"{r['bytes_seen']:,} | {r['bytes_per_token']:.3f} | {r['vocab']:,} | {r['trainable']:,} | "
                     f"{r['trunk'] or '–'} | {exact} | {r['seconds']:.0f} |")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], figure: Path) -> None:
    """Recipes bpb per base and tokenizer (bars: the mean, dots: the seeds), the scratch expert dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    scratch = [r["bpb"] for r in rows if r["base_exact"] is None]
    bases = [b for b in dict.fromkeys(r["base"] for r in rows) if not b.startswith("none")]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, tokenizer in enumerate(TOKENIZERS):
        means = []
        for i, b in enumerate(bases):
            values = [r["bpb"] for r in rows if r["base"] == b and r["tokenizer"] == tokenizer]
            means.append(np.mean(values))
            ax.scatter([i + (k - 0.5) * 0.35] * len(values), values, color="black", s=10, zorder=3)
        ax.bar(np.arange(len(bases)) + (k - 0.5) * 0.35, means, 0.35, label=f"tokenizer={tokenizer}")
    ax.axhline(np.mean(scratch), color="gray", ls="--", label="recipes scratch expert")
    ax.set_xticks(range(len(bases)), [f"{b} base" for b in bases])
    ax.set_ylabel("recipes validation bpb (lower is better)")
    ax.set_ylim(bottom=min(r["bpb"] for r in rows) * 0.8)
    ax.legend(fontsize=8)
    ax.set_title(f"expand_branch on a pretrained base, {rows[0]['tokens']:,} recipe tokens", fontsize=9)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "pretrained-tokenizer")
    p.add_argument("--steps", type=int, default=64, help="recipes training steps of every run (x 32 x 256 tokens)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "pretrained_tokenizer.md")
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "pretrained_tokenizer.png")
    args = p.parse_args()
    bases = make_bases(args.out)
    described = describe_bases(args.out, bases)
    print("\n".join(described), flush=True)
    rows = measure(args.out, bases, args.steps, args.seeds)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    write_report(args.out, rows, args.steps, described, args.report)
    plot(rows, args.figure)
    print(args.report.read_text())


if __name__ == "__main__":
    main()
