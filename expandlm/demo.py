"""The demo (the README's main command): one expert per domain, trained, evaluated and sampled.

Re-running the same command reuses finished experts and resumes interrupted ones.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .atomic import write_json, write_text
from .config import arg, config
from .corpus import default_data_dir
from .domains import DOMAINS, get_domain
from .errors import UserError
from .expert import ExpertSpec, log, train_expert
from .generate import SamplingConfig, generate
from .report import markdown_table, plot_curves
from .run_folder import RunFolder, versions
from .serving import load_served
from .train import TrainConfig


def _demo_training() -> TrainConfig:
    return TrainConfig(minutes=6.0, eval_interval=50)


@config
class DemoConfig:
    out: str = arg("runs/demo", "the folder for the experts, report and plots")
    preset: str = arg("tiny", "model size: nano | tiny | small | base")
    domains: list[str] = arg(help="the domains to train an expert for", factory=lambda: list(DOMAINS))
    data_dir: str | None = arg(None, "folder with the corpora (default: $EXPANDLM_DATA or ../shared/data)")
    hub: bool = arg(False, "load the corpora from the Hugging Face Hub instead (online users)")
    limit: int | None = arg(None, "use only the first N documents of each corpus")
    samples: int = arg(2, "samples per domain")
    train: TrainConfig = arg(help="training settings of every expert (6 minutes each by default)",
                             factory=_demo_training)


def _sources(cfg: DemoConfig, domain_name: str) -> tuple[str, str | None]:
    domain = get_domain(domain_name)
    if cfg.hub:
        if domain.hub_id is None:
            raise UserError(f"domain '{domain_name}' has no hub dataset; drop --hub")
        return domain.hub_id, (domain.hub_id if domain.hub_val_split else None)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    if data_dir is None or domain.train_file is None or not (data_dir / domain.train_file).exists():
        raise UserError(f"corpus for '{domain_name}' not found (looked for {domain.train_file} in "
                        f"{data_dir or '$EXPANDLM_DATA or ../shared/data'}); pass --data-dir, or --hub when online")
    return str(data_dir / domain.train_file), str(data_dir / domain.valid_file)


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    started = time.time()
    rows, samples = [], {}
    for name in cfg.domains:
        domain = get_domain(name)
        data, val = _sources(cfg, name)
        folder = RunFolder(out / name)
        state = folder.auto()
        if state == "done":
            log(f"== {name}: reusing the finished expert in {folder.path}")
            record = folder.record()
        else:
            log(f"== {name}: {'resuming' if state == 'resume' else 'training'} a {cfg.preset} expert"
                + (f" for {cfg.train.minutes:g} min" if cfg.train.minutes else ""))
            spec = ExpertSpec(domain=name, data=data, val_data=val, out=str(folder.path), preset=cfg.preset,
                              limit=cfg.limit, train=cfg.train)
            record = train_expert(spec, resume=state == "resume")
        served = load_served(folder.path)
        drawn = generate(served.for_domain(name), served.tokenizer_for(name), domain, domain.demo_prompt,
                         num_samples=cfg.samples, sampling=SamplingConfig(seed=cfg.train.seed))
        samples[name] = [{"prompt": domain.demo_prompt, "text": s.text, "finished": s.finished} for s in drawn]
        rows.append({"domain": name, "params": record["params"], "tokens": record["tokens"],
                     "minutes": round(record["train_seconds"] / 60, 2), "val_bpb": round(record["val_bpb"], 4),
                     "val_documents": record["val"]["documents"], "model": str(folder.path)})

    results = {"config": dataclasses.asdict(cfg), "versions": versions(), "experts": rows, "samples": samples,
               "seconds": round(time.time() - started, 1)}
    write_json(out / "results.json", results)
    curves = {r["domain"]: RunFolder(r["model"]).metrics() for r in rows}
    plot_curves(curves, out / "learning_curves.png", title=f"{cfg.preset} experts")
    write_text(out / "report.md", _report(cfg, rows, samples, results["seconds"]))
    print("\n" + markdown_table(rows, ["domain", "params", "tokens", "minutes", "val_bpb"]))
    for name, drawn in samples.items():
        for i, s in enumerate(drawn, 1):
            print(f"\n--- {name} sample {i} {'' if s['finished'] else '(hit the length limit)'}\n{s['text']}")
    print(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}")
    return results


def _report(cfg: DemoConfig, rows: list[dict], samples: dict, seconds: float) -> str:
    budget = f"for {cfg.train.minutes:g} minutes" if cfg.train.minutes else "on its budget"
    lines = [f"# expandlm demo: one {cfg.preset} expert per domain", "",
             f"Each expert was trained from scratch {budget} with its own byte-level BPE; "
             "bpb is bits per byte on the domain's validation set (lower is better).", "",
             markdown_table(rows, ["domain", "params", "tokens", "minutes", "val_bpb", "val_documents"]), "",
             "![learning curves](learning_curves.png)", "", f"Total wall time: {seconds / 60:.1f} min.", ""]
    for name, drawn in samples.items():
        for i, s in enumerate(drawn, 1):
            lines += [f"## {name}, sample {i} (prompt: {s['prompt']!r})", "", "```", s["text"], "```", ""]
    return "\n".join(lines)
