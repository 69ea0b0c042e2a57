"""What a grown model costs on disk and in memory: a base and three domains grown from it with
expand_branch (frozen trunk), stored as the branch format stores them now (only what each branch
trained, the trunk shared) against whole copies (how a branch was stored before: the branch model
whole, which `export` still writes), in one run.

The base is a randomly initialised Llama-shaped checkpoint saved by transformers (GQA, untied head;
`--hidden`, `--layers`, `--vocab`), with a byte-level BPE trained on the bundled corpora; stories,
recipes and code are each grown from it with `expandlm adapt` (a few steps: storage and memory do not
depend on how long a branch trained). Then, each in a fresh process on the CPU:

- shared: the base and the three branch folders loaded as `expandlm serve` loads them (one `opened`
  map: the base is loaded once and every branch takes the trunk's tensors);
- copies: the same four folders with each branch stored whole, loaded the same way (the base once, each
  branch a copy of the trunk);
- copies, no sharing: the whole-stored folders each loaded on its own, as `serve` loaded them before
  (each branch opened its base again).

Memory, after every domain of every folder answered once (so every weight served was read): the
weights held (the bytes of every distinct tensor storage of the loaded models: what a GPU would hold),
and the growth of the resident set (VmRSS), split into anonymous memory and file-backed pages
(transformers maps a checkpoint's safetensors file; a file mapped twice counts twice in VmRSS, once in
the page cache). Load time is the wall time of the loads.

    python benchmarks/branch_storage.py                          # ~90M-parameter base, ~3 minutes on 2 cores
    python benchmarks/branch_storage.py --hidden 256 --layers 4  # quick
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from expandlm.atomic import write_json, write_text  # noqa: E402

DOMAINS = ("stories", "recipes", "code")
SETUPS = {"shared": "branch folders (trained tensors only), one `opened` map",
          "copies": "whole branches, one `opened` map",
          "copies, no sharing": "whole branches, each folder loaded on its own (serve before)"}


def make_base(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    """A random Llama-shaped checkpoint as transformers saves it (no expandlm files); its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from expandlm.data.corpus import default_data_dir, load_corpus
    from expandlm.data.tokenizer import train_bpe
    from expandlm.domains import get_domain
    texts = [d for name in DOMAINS
             for d in load_corpus(get_domain(name).data_file("train", default_data_dir()), get_domain(name),
                                  limit=300).documents]
    tok = train_bpe(texts, vocab, [])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def grow(base: Path, out: Path, domain: str, steps: int) -> None:
    from expandlm.cli import main
    code = main(["adapt", "--base", str(base), "--domain", domain, "--out", str(out), "--limit", "200",
                 "--val-limit", "4", "--max-steps", str(steps), "--batch-size", "2", "--eval-interval", "0",
                 "--no-progress", "--option", "trunk=frozen"])
    if code != 0:
        raise SystemExit(f"adapt {domain} failed")


def stored_whole(branch: Path, out: Path) -> None:
    """The branch folder as it was stored before: the branch model whole beside its card and tokenizer."""
    from expandlm.formats.branch import WEIGHTS
    from expandlm.formats.served import load_served
    shutil.copytree(branch, out)
    (out / WEIGHTS).unlink()
    served = load_served(branch, device="cpu")  # `base` stays valid: the copy sits beside the branch
    served.export_model(served.domains[-1]).save_pretrained(out)


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


MEASURE = r"""
import gc, json, sys, time
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
import torch, transformers
from expandlm.formats.served import load_served
before = {k: status(k) for k in ('VmRSS:', 'RssAnon:', 'RssFile:')}
folders, share = json.loads(sys.argv[1]), sys.argv[2] == 'share'
opened = {}
start = time.perf_counter()
served = [load_served(f, device='cpu', opened=opened if share else None) for f in folders]
seconds = time.perf_counter() - start
storages = {}  # every distinct tensor storage the loaded models hold: the weights held in memory
for s in served:
    for t in [*s.model.parameters(), *s.model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
with torch.no_grad():  # every domain of every folder answers once, so every weight it serves is read
    for s in served:
        for d in s.domains:
            s.for_domain(d)(input_ids=torch.tensor([[1, 2, 3]]))
gc.collect()
print(json.dumps({"weights": sum(storages.values()), "rss": status('VmRSS:') - before['VmRSS:'],
                  "anon": status('RssAnon:') - before['RssAnon:'], "file": status('RssFile:') - before['RssFile:'],
                  "seconds": seconds}))
"""


def child_env() -> dict:
    """This environment, with the checkout first on the import path (the GPU check adds its wheels there)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def measure(folders: list[Path], share: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps([str(f) for f in folders]),
                          "share" if share else "alone"], capture_output=True, text=True, cwd=ROOT,
                         env={**child_env(), "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(result: dict, out: Path) -> str:
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    rows = [f"Base: {result['base_params']:,} parameters (Llama-shaped, random; hidden {result['hidden']}, "
            f"{result['layers']} blocks, vocab {result['vocab']}, fp32), and {', '.join(DOMAINS)} grown from it with "
            f"expand_branch, frozen trunk. Command: `{result['command']}`.", "",
            "| folder | stored now | stored whole | ratio |", "|---|---:|---:|---:|"]
    for name, size in result["disk"].items():
        rows.append(f"| {name} | {mib(size['now'])} | {mib(size['whole'])} | {size['whole'] / size['now']:.2f}x |")
    total_now, total_whole = (sum(s[k] for s in result["disk"].values()) for k in ("now", "whole"))
    rows += [f"| **all four** | **{mib(total_now)}** | **{mib(total_whole)}** | **{total_whole / total_now:.2f}x** |",
             "", "| loaded (base + 3 domains, CPU) | weights held | resident | of it anonymous | of it file-backed "
             "| load time |", "|---|---:|---:|---:|---:|---:|"]
    for name, m in result["memory"].items():
        rows.append(f"| {name}: {SETUPS[name]} | {mib(m['weights'])} | {mib(m['rss'])} | {mib(m['anon'])} | "
                    f"{mib(m['file'])} | {m['seconds']:.1f} s |")
    write_text(out.with_suffix(".md"), "# Branch storage: only what a branch trained, the trunk shared\n\n"
               + "\n".join(rows) + "\n")
    return "\n".join(rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (disk, memory) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(result["disk"])
    width = 0.38
    for k, (key, label) in enumerate((("now", "stored now"), ("whole", "stored whole"))):
        disk.bar([i + (k - 0.5) * width for i in range(len(names))],
                 [result["disk"][n][key] / 2**20 for n in names], width, label=label)
    disk.set_xticks(range(len(names)), names)
    disk.set_ylabel("MiB on disk")
    disk.set_title("folder weights")
    disk.legend()
    setups = list(result["memory"])
    for k, (key, label) in enumerate((("weights", "weights held"), ("rss", "resident"))):
        memory.bar([i + (k - 0.5) * width for i in range(len(setups))],
                   [result["memory"][s][key] / 2**20 for s in setups], width, label=label)
    memory.set_xticks(range(len(setups)), [s.replace(", ", ",\n") for s in setups])
    memory.set_ylabel("MiB")
    memory.legend()
    memory.set_title("base + 3 domains loaded")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-branch-storage")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "branch_storage")
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "branch_storage.png")
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    base = args.work / "base"
    params = make_base(base, args.hidden, args.layers, args.vocab)
    for d in DOMAINS:
        grow(base, args.work / d, d, args.steps)
        stored_whole(args.work / d, args.work / f"{d}-whole")
    now = [base, *(args.work / d for d in DOMAINS)]
    whole = [base, *(args.work / f"{d}-whole" for d in DOMAINS)]
    result = {"base_params": params, "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
              "command": "python benchmarks/branch_storage.py " + " ".join(sys.argv[1:]),
              "disk": {f.name: {"now": weights_bytes(f), "whole": weights_bytes(w)} for f, w in zip(now, whole)},
              "memory": {"shared": measure(now, True), "copies": measure(whole, True),
                         "copies, no sharing": measure(whole, False)}}
    write_json(args.out.with_suffix(".json"), result)
    print(report(result, args.out))
    plot(result, args.figure)


if __name__ == "__main__":
    main()
