"""The demo (the README's main command): one model that learns a domain at a time and answers each.

The first domain gets an expert trained from scratch; each further domain is added to that model by
`adapt` with the default strategy (expand_branch: the old domains stay bit for bit what they were).
The finished model then answers a free-text request per domain (routed, then tokenized by the chosen
domain's tokenizer), and the report gives per domain: bpb, whether the old domains' outputs are still
exactly the expert's (measured on logits), structural validity against its fit ceiling, text health
and three samples. Re-running the same command reuses finished stages and resumes interrupted ones.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch

from ..adapt.run import AdaptSpec, adapt
from ..atomic import write_json, write_text
from ..config import arg, config
from ..data.corpus import default_data_dir, load_corpus
from ..domains import get_domain
from ..errors import UserError
from ..process import log
from ..training.expert import ExpertSpec, train_expert
from ..inference.generate import SamplingConfig, generate
from .report import markdown_table, plot_curves
from ..routing.router import route_request
from ..records import RunRecord
from ..run_folder import RunFolder, versions
from ..formats.served import context_length, load_served
from ..adapt import DEFAULT_METHOD, make_method
from ..formats import FORMATS
from ..evaluation.suite import text_health, validity, validity_ceiling
from ..data.tokenizer import encode_texts
from ..training.loop import TrainConfig

SHOWN = 3          # samples per domain in the report
CHECK_DOCS = 16    # validation documents whose logits must match the expert's exactly
# Below this many training tokens per trainable parameter a stage's samples read as random words. The
# measured demos on the tiny preset: 1.5 (stories) and 3.1 (+recipes) on a quiet machine wrote stories
# and ingredient lists (1.52 and 1.39 bpb); 0.09 and 0.20 on a busy one wrote word salad (2.50, 2.53 bpb).
FEW_TOKENS_PER_PARAMETER = 0.5


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def _demo_preset() -> str:
    # a GPU trains the small preset to coherent stories in a minute or two (measured on an H200: 13M tokens
    # in 30 s); the CPU shows the tiny one in its 6 minutes a stage
    return "small" if _on_gpu() else "tiny"


def _demo_training() -> TrainConfig:
    return TrainConfig(minutes=1.5, eval_interval=100, batch_size=64) if _on_gpu() else \
        TrainConfig(minutes=6.0, eval_interval=50)


@config
class DemoConfig:
    out: str = arg("runs/demo", "the folder for the models, report and plots")
    preset: str = arg(help="model size: nano | tiny | small | base (default: small on a GPU, tiny on the CPU)",
                      factory=_demo_preset)
    domains: list[str] = arg(help="the first gets an expert trained from scratch; each next one is added to "
                                  "the same model with --method", factory=lambda: ["stories", "recipes"])
    method: str = arg(DEFAULT_METHOD, "how each further domain is added (see `expandlm adapt`)", aliases=("strategy",))
    options: dict = arg(help="the method's options", factory=dict, flag=False)
    data_dir: str | None = arg(None, "folder with the corpora (default: $EXPANDLM_DATA or ../shared/data)")
    hub: bool = arg(False, "load the corpora from the Hugging Face Hub instead (online users)")
    limit: int | None = arg(None, "use only the first N documents of each corpus")
    samples: int = arg(20, f"samples per domain for validity and text health ({SHOWN} shown in the report)")
    train: TrainConfig = arg(help="training settings of every stage (by default 6 minutes each on the CPU; "
                                  "1.5 minutes at batch 64 on a GPU)",
                             factory=_demo_training)


def _sources(cfg: DemoConfig, domain_name: str) -> tuple[str, str | None]:
    domain = get_domain(domain_name)
    if cfg.hub:
        if domain.hub_id is None:
            raise UserError(f"domain '{domain_name}' has no hub dataset; drop --hub")
        return domain.hub_id, (domain.hub_id if domain.hub_val_split else None)
    return domain.local_files(Path(cfg.data_dir) if cfg.data_dir else default_data_dir())


def _stage(folder: RunFolder, what: str, run) -> RunRecord:
    """A finished stage is reused, an interrupted one resumed; `run(resume)` trains it."""
    state = folder.auto()
    if state == "done":
        log(f"== {what}: reusing the finished run in {folder.path}")
        return folder.record()
    log(f"== {what}: {'resuming' if state == 'resume' else 'training'} in {folder.path}")
    return run(state == "resume")


@torch.no_grad()
def _same_outputs(expert, model, tokenizer, documents: list[str]) -> bool:
    """Whether two models give bit-identical logits on the documents (one at a time: no padding)."""
    context = expert.config.max_position_embeddings
    for ids in encode_texts(tokenizer, documents):
        batch = torch.tensor([ids[:context]])
        if not torch.equal(expert(input_ids=batch).logits, model(input_ids=batch).logits):
            return False
    return True


def run_demo(cfg: DemoConfig) -> dict:
    if len(cfg.domains) < 2 or len(set(cfg.domains)) != len(cfg.domains):
        raise UserError(f"--domains {','.join(cfg.domains)}: name two or more distinct domains "
                        "(the first gets an expert, each next one is added to it)")
    method = make_method(cfg.method, cfg.options)
    if len(cfg.domains) > 2 and not FORMATS[method.format].one_set_of_weights:
        raise UserError(f"strategy '{method.name}' adds one domain to an expert; it cannot add a third yet")
    out, started = Path(cfg.out), time.time()
    RunFolder(out).claim()  # its stages, report and results go here: never into a user's folder
    sources = {name: _sources(cfg, name) for name in cfg.domains}
    stages, records = _train_stages(cfg, method.name, sources, out)
    domains, answers, samples = _measure_domains(cfg, sources, stages, records[-1].bpb)
    stage_rows = [{"stage": f.path.name, "method": r.strategy or "scratch", "trainable": r.trainable_params,
                   "total": r.total_params, "tokens": r.tokens, "minutes": round(r.train_seconds / 60, 2)}
                  for f, r in zip(stages, records)]

    results = {"config": dataclasses.asdict(cfg), "versions": versions(), "stages": stage_rows, "domains": domains,
               "answers": answers, "samples": samples, "seconds": round(time.time() - started, 1),
               "warnings": [w for f, r in zip(stages, records) if (w := too_few_tokens(f.path.name, r, cfg))]}
    write_json(out / "results.json", results)
    plot_curves({f.path.name: f.metrics() for f in stages}, out / "learning_curves.png",
                title=f"{cfg.preset}: {cfg.domains[0]} expert, then each domain added", eval_docs=cfg.train.eval_docs)
    write_text(out / "report.md", _report(cfg, results))
    print("\n" + markdown_table(stage_rows, list(stage_rows[0])) + "\n\n" + markdown_table(domains, list(domains[0])))
    for a in answers:
        print(f"\n--- {a['request']!r} → {a['domain']} ({a['confidence']:.0%}; {a['reason']})"
              f"{'' if a['finished'] else ' (hit the length limit)'}\n{a['text']}")
    print(f"\nreport: {out / 'report.md'}  results: {out / 'results.json'}")
    for warning in results["warnings"]:  # the run's last word: a poor result says why and what to do
        log(f"warning: {warning}")
    return results


def too_few_tokens(stage: str, r: RunRecord, cfg: DemoConfig) -> str | None:
    """What to say of a stage whose budget bought too few tokens for readable text; None when it bought enough."""
    per_parameter = r.tokens / max(r.trainable_params or 1, 1)
    if per_parameter >= FEW_TOKENS_PER_PARAMETER:
        return None
    wanted = math.ceil(FEW_TOKENS_PER_PARAMETER * r.trainable_params / 1e5) * 100_000
    pace = r.tokens / max(r.train_seconds, 1e-9)
    share, threads = r.details.get("cpu_share"), r.details.get("cpu_threads")
    busy = (f"; it got {share:.0%} of its {threads} threads' CPU time: the machine was busy"
            if share is not None and threads and share < 0.8 else "")
    budget = f"{cfg.train.minutes:g} minutes" if cfg.train.minutes else "its budget"
    return (f"stage {stage} trained only {r.tokens:,} tokens in {budget} ({pace:,.0f} tokens/s{busy}): "
            f"{per_parameter:.2f} per trainable parameter, too few for readable text (it needs at least "
            f"{wanted:,}). At this pace that takes --minutes {math.ceil(wanted / pace / 60)}; run again with it "
            "and a new --out (finished stages are reused), or on a quiet machine.")


def _train_stages(cfg: DemoConfig, method: str, sources: dict, out: Path) -> tuple[list[RunFolder], list[dict]]:
    """The first domain's expert, then each further domain added to the previous stage's model by `method`:
    the stage folders and their run records."""
    first, *added = cfg.domains
    stages = [RunFolder(out / first)]
    records = [_stage(stages[0], f"{first} expert", lambda resume: train_expert(ExpertSpec(
        domain=first, data=sources[first][0], val_data=sources[first][1], out=str(stages[0].path),
        preset=cfg.preset, limit=cfg.limit, train=cfg.train), resume=resume))]
    for name in added:
        base, folder = stages[-1], RunFolder(out / f"+{name}")
        records.append(_stage(folder, f"+{name} ({method})", lambda resume: adapt(AdaptSpec(
            base=str(base.path), method=cfg.method, domain=name, data=sources[name][0], val_data=sources[name][1],
            out=str(folder.path), options=cfg.options, limit=cfg.limit, train=cfg.train), resume=resume)))
        stages.append(folder)
    return stages, records


def _measure_domains(cfg: DemoConfig, sources: dict, stages: list[RunFolder], bpb: dict) -> tuple[list, list, dict]:
    """Per domain, from the final model: its answer to the domain's request (routed), its samples, and the
    report's line (bpb, same outputs as the expert's for the first domain, validity, health)."""
    served, expert = load_served(stages[-1].path, device="cpu"), load_served(stages[0].path, device="cpu")
    sampling = SamplingConfig(seed=cfg.train.seed)
    domains, answers, samples = [], [], {}
    for name in cfg.domains:
        domain, tokenizer = get_domain(name), served.tokenizer_for(name)
        val_docs = load_corpus(sources[name][1], domain, "validation").documents
        route = route_request(domain.demo_request, served)  # routed first, then read by that domain's tokenizer
        answer = generate(served.decode_model(route.domain), served.tokenizer_for(route.domain),
                          get_domain(route.domain), route.prompt, 1, sampling)[0]
        answers.append({"request": domain.demo_request, "domain": route.domain, "confidence": route.confidence,
                        "reason": route.reason, "prompt": route.prompt, "text": answer.text,
                        "finished": answer.finished})
        drawn = generate(served.decode_model(name), tokenizer, domain, "", cfg.samples, sampling)
        pairs = [(s.text, s.finished) for s in drawn]
        samples[name] = [{"text": s.text, "finished": s.finished} for s in drawn]
        health = text_health(pairs)
        domains.append({
            "domain": name, "bpb": round(bpb[name], 4), "documents": len(val_docs),
            "same as its expert": (_same_outputs(expert.model, served.for_domain(name), tokenizer,
                                                 val_docs[:CHECK_DOCS]) if name == cfg.domains[0] else None),
            "valid": validity(domain, pairs),
            "valid ceiling": validity_ceiling(domain, val_docs, tokenizer, context_length(served.path)),
            "ended": health["finished_share"], "distinct-2": round(health["distinct_2"], 3),
            "repeated 4-grams": round(health["repeated_4gram_rate"], 3)})
    return domains, answers, samples


def _report(cfg: DemoConfig, results: dict) -> str:
    first = cfg.domains[0]
    budget = f"for {cfg.train.minutes:g} minutes" if cfg.train.minutes else "on its budget"
    lines = [f"# expandlm demo: one {cfg.preset} model, {' + '.join(cfg.domains)}", "",
             *[f"**Warning:** {w}\n" for w in results["warnings"]],
             f"A {first} expert was trained from scratch {budget} with its own byte-level BPE; then each further "
             f"domain was added to it with `{cfg.method}` {budget}. One model folder now serves every domain.", "",
             markdown_table(results["stages"], list(results["stages"][0])), "",
             "Per domain, from the final model: bpb on the whole validation set (bits per byte, lower is better; "
             f"`documents` of it; the curves' periodic passes read the first {cfg.train.eval_docs}, so their last "
             "point differs); "
             f"`same as its expert`: whether its logits on {CHECK_DOCS} validation documents are bit-identical to "
             f"the {first} expert's; `valid`: share of {cfg.samples} samples that pass the domain's structural "
             "check and ended, against the same share of real validation documents that fit the context "
             "(`valid ceiling`); `ended`, `distinct-2`, `repeated 4-grams`: text health of the samples.", "",
             markdown_table(results["domains"], list(results["domains"][0])), "",
             "![learning curves](learning_curves.png)", "", f"Total wall time: {results['seconds'] / 60:.1f} min.", "",
             "## One request per domain", ""]
    for a in results["answers"]:
        lines += [f"**{a['request']!r}** → {a['domain']} ({a['confidence']:.0%}; {a['reason']}), "
                  f"prompt {a['prompt']!r}{'' if a['finished'] else ' (hit the length limit)'}", "",
                  "```", a["text"], "```", ""]
    for name, drawn in results["samples"].items():
        for i, s in enumerate(drawn[:SHOWN], 1):
            lines += [f"## {name}, sample {i}{'' if s['finished'] else ' (hit the length limit)'}", "",
                      "```", s["text"], "```", ""]
    return "\n".join(lines)
