"""The demo (the README's main command): one tiny expert per domain, trained, evaluated and sampled.

Re-running the same command reuses finished experts and resumes interrupted ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .artifacts import read_json, versions, write_json_atomic, write_text_atomic
from .corpus import default_data_dir
from .domains import get_domain
from .errors import UserError
from .expert import RUN_RECORD, ExpertSpec, log, train_expert
from .generate import SamplingConfig, generate
from .serving import load_served
from .report import markdown_table, plot_curves
from .train import CHECKPOINT, TrainConfig, read_metrics

DOMAIN_PROMPTS = {"stories": "Once upon a time", "recipes": "Banana Bread"}


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    preset: str = "tiny"
    minutes: float = 6.0          # training budget per domain
    domains: tuple[str, ...] = ("stories", "recipes")
    data_dir: str | None = None   # default: ../shared/data
    hub: bool = False             # load the corpora from the Hugging Face Hub instead (online users)
    limit: int | None = None      # use only the first N documents of each corpus
    samples: int = 2
    seed: int = 0
    batch_size: int = 32
    progress: bool = True


def _sources(cfg: DemoConfig, domain_name: str) -> tuple[str, str | None]:
    domain = get_domain(domain_name)
    if cfg.hub:
        # corbt/all-recipes has only a train split: its validation set is then a held-out slice.
        return domain.hub_id, (domain.hub_id if domain_name == "stories" else None)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    if data_dir is None or not (data_dir / domain.train_file).exists():
        raise UserError(f"corpus for '{domain_name}' not found (looked for {domain.train_file} in "
                        f"{data_dir or '$EXPANDLM_DATA or ../shared/data'}); pass --data-dir, or --hub when online")
    return str(data_dir / domain.train_file), str(data_dir / domain.valid_file)


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    started = time.time()
    rows, samples = [], {}
    for name in cfg.domains:
        data, val = _sources(cfg, name)
        expert_dir = out / name
        done = (expert_dir / RUN_RECORD).exists() and read_json(expert_dir / RUN_RECORD).get("status") == "done"
        if done:
            log(f"== {name}: reusing the finished expert in {expert_dir}")
            record = read_json(expert_dir / RUN_RECORD)
        else:
            resume = (expert_dir / CHECKPOINT / "train_state.json").exists()
            log(f"== {name}: {'resuming' if resume else 'training'} a {cfg.preset} expert for {cfg.minutes:g} min")
            train_cfg = TrainConfig(minutes=cfg.minutes, seed=cfg.seed, batch_size=cfg.batch_size,
                                    eval_interval=50, eval_docs=200, progress=cfg.progress)
            spec = ExpertSpec(domain=name, data=data, val_data=val, out=str(expert_dir), preset=cfg.preset,
                              limit=cfg.limit, train=train_cfg)
            record = train_expert(spec, resume=resume)
        served = load_served(expert_dir)
        prompt = DOMAIN_PROMPTS.get(name, "")
        drawn = generate(served.for_domain(name), served.tokenizer, get_domain(name), prompt, num_samples=cfg.samples,
                         sampling=SamplingConfig(seed=cfg.seed))
        samples[name] = [{"prompt": prompt, "text": s.text, "finished": s.finished} for s in drawn]
        rows.append({"domain": name, "params": record["params"], "tokens": record["tokens"],
                     "minutes": round(record["train_seconds"] / 60, 2), "val_bpb": round(record["val_bpb"], 4),
                     "val_documents": record["val"]["documents"], "model": str(expert_dir)})

    results = {"config": cfg.__dict__, "versions": versions(), "experts": rows, "samples": samples,
               "seconds": round(time.time() - started, 1)}
    write_json_atomic(out / "results.json", results)
    curves = {r["domain"]: read_metrics(Path(r["model"])) for r in rows}
    plot_curves(curves, out / "learning_curves.png", title=f"{cfg.preset} experts")
    write_text_atomic(out / "report.md", _report(cfg, rows, samples, results["seconds"]))
    columns = ["domain", "params", "tokens", "minutes", "val_bpb"]
    print("\n" + markdown_table(rows, columns))
    for name, drawn in samples.items():
        for i, s in enumerate(drawn, 1):
            print(f"\n--- {name} sample {i} {'' if s['finished'] else '(hit the length limit)'}\n{s['text']}")
    print(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}")
    return results


def _report(cfg: DemoConfig, rows: list[dict], samples: dict, seconds: float) -> str:
    lines = [f"# expandlm demo: one {cfg.preset} expert per domain", "",
             f"Each expert was trained from scratch for {cfg.minutes:g} minutes with its own byte-level BPE; "
             "bpb is bits per byte on the domain's validation set (lower is better).", "",
             markdown_table(rows, ["domain", "params", "tokens", "minutes", "val_bpb", "val_documents"]), "",
             "![learning curves](learning_curves.png)", "", f"Total wall time: {seconds / 60:.1f} min.", ""]
    for name, drawn in samples.items():
        for i, s in enumerate(drawn, 1):
            lines += [f"## {name}, sample {i} (prompt: {s['prompt']!r})", "", "```", s["text"], "```", ""]
    return "\n".join(lines)
