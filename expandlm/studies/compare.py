"""The cross-domain study in one command: `expandlm compare CONFIG.yaml --out DIR`.

For each seed: train the old domain's expert (the base) and the new domain's scratch expert (the
reference), adapt the base with every strategy of the config at equal training tokens on the new
domain, then run the evaluation suite (docs/DESIGN.md, "Metrics") on every model. Optionally a tokenizer study
(per-domain BPE vs shared BPE vs GPT-2 vs bytes, equal model and tokens). Every stage writes its own
folder and is reused when finished (resumed when interrupted), so a killed study continues where it
stopped. Writes `results.json`, `report.md`, plots and sample generations.

With `grow` (a growth study), every strategy adds the new domain, then each domain of `grow` in turn,
each step adapting the previous step's model of the same strategy; every domain gets a scratch expert
as reference, and every step is evaluated on every domain it serves (`growth.png`, one table).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

from ..adapt.run import AdaptSpec, adapt
from ..atomic import read_json, write_json
from ..config import arg, build, config, load_yaml
from ..data.corpus import default_data_dir, load_corpus, load_train_val
from ..domains import get_domain, is_spec_path
from ..errors import UserError
from ..evaluation.bpb import evaluate_bpb
from ..training.expert import ExpertSpec, log, train_expert
from ..inference.generate import SamplingConfig, generate
from .report import write_growth_report, write_study_report
from ..run_folder import SUITE, RunFolder, versions
from ..formats.served import context_length, load_served, tokenizer_folder
from ..data.shards import build_shard
from ..adapt import method_class
from ..formats import FORMATS
from ..routing.classifier import DomainClassifier
from ..evaluation.suite import domain_control_accuracy, text_health, validity, validity_ceiling
from ..data.tokenizer import load_tokenizer, train_bpe
from ..training.loop import TrainConfig


@config
class StrategyRun:
    name: str = arg(help="a registered strategy")
    label: str | None = arg(None, "the run's name in the study (default: the strategy's)")
    options: dict = arg(help="the strategy's options", factory=dict)
    expand_vocab: int = arg(0, "tokens learned from the new domain and appended to the tokenizer")
    train: dict = arg(help="this run's own training settings over the study's (e.g. {lr: 0.004})", factory=dict)
    seeds: list[int] | None = arg(None, "run only at these of the study's seeds (default: all)")
    adapt_tokens: list[int] | None = arg(None, "run only at these of the study's budgets (default: all)")

    @property
    def key(self) -> str:
        return self.label or self.name


@config
class EvalConfig:
    samples: int = arg(50, "generated samples per domain (control accuracy, validity, health)")
    max_new_tokens: int | None = arg(None, "tokens per sample (default: fill the context)")
    temperature: float = arg(0.8, "sampling temperature of the samples")
    classifier_docs: int = arg(3000, "real training documents per domain for the held-out classifier")


@config
class TokenizerStudy:
    tokenizers: list[str] = arg(help="custom | shared | gpt2 | bytes", factory=lambda: ["custom", "shared", "gpt2", "bytes"])
    tokens: int = arg(500_000, "training tokens per model (equal for every tokenizer)")


@config
class StudyConfig:
    old_domain: str = arg(help="the base expert's domain")
    new_domain: str = arg(help="the domain every strategy adds")
    grow: list[str] | None = arg(None, "a growth study: domains every strategy adds after new_domain, one at a time, "
                                 "each step adapting the previous step's model")
    preset: str = arg("tiny", "model size of every model")
    seeds: list[int] = arg(help="one full study per seed", factory=lambda: [0])
    data_dir: str | None = arg(None, "folder with the corpora (default: $EXPANDLM_DATA or ../shared/data)")
    limit: int | None = arg(None, "first N documents of each corpus")
    val_limit: int | None = arg(None, "first N documents of each validation set (None: all)")
    base_tokens: int = arg(2_000_000, "training tokens of the old domain's expert")
    adapt_tokens: int | list[int] = arg(1_000_000, "training tokens of every strategy and of the new domain's "
                                        "scratch expert; a list gives a learning curve, one point per budget")
    train: TrainConfig = arg(help="training loop settings of every run (budget and seed are set per stage)",
                             factory=TrainConfig)
    strategies: list[StrategyRun] = arg(help="the strategies to compare", factory=list)
    tokenizer_study: TokenizerStudy | None = arg(None, "also compare tokenizers at equal tokens")
    evaluation: EvalConfig = arg(help="the evaluation suite", factory=EvalConfig)

    @property
    def domains(self) -> list[str]:
        return [self.old_domain, self.new_domain, *(self.grow or [])]

    @property
    def added(self) -> list[str]:
        """The domains the strategies add, in order (one in a two-domain study)."""
        return self.domains[1:]

    @property
    def budgets(self) -> list[int]:
        return sorted(self.adapt_tokens) if isinstance(self.adapt_tokens, list) else [self.adapt_tokens]

    def runs_at(self, seed: int, tokens: int) -> list[StrategyRun]:
        return [r for r in self.strategies if seed in (r.seeds or self.seeds)
                and tokens in (r.adapt_tokens or self.budgets)]


def budget_label(tokens: int) -> str:
    """2000000 → '2M', 500000 → '0.5M' (a folder name)."""
    return f"{tokens / 1e6:g}M"


def load_config(path: str | Path):
    """A study config: the two-domain (or growth) study."""
    data = load_yaml(path)
    cfg = build(StudyConfig, data, str(path))
    # one label is one curve: entries may share it to run it at different seeds per budget, never twice
    # at the same point, and always as the same strategy
    points, kind = set(), {}
    for run in cfg.strategies:
        for point in ((run.key, seed, tokens) for seed in (run.seeds or cfg.seeds)
                      for tokens in (run.adapt_tokens or cfg.budgets)):
            if point in points:
                raise UserError(f"{path}: strategies: two runs labelled '{run.key}' share seed {point[1]} and "
                                f"{point[2]:,} tokens; give each a distinct 'label'")
            points.add(point)
        same = (run.name, run.options, run.expand_vocab, run.train)
        if kind.setdefault(run.key, same) != same:
            raise UserError(f"{path}: strategies: runs labelled '{run.key}' differ in strategy or settings")
    def named(name: str) -> str:  # a domain spec's path is relative to the config; then its name
        if is_spec_path(name) and not Path(name).is_absolute():
            name = str(Path(path).parent / name)
        return get_domain(name).name

    cfg.old_domain, cfg.new_domain = named(cfg.old_domain), named(cfg.new_domain)
    if cfg.grow is not None:
        cfg.grow = [named(d) for d in cfg.grow]
        check_growth(cfg, path)
    for run in cfg.strategies:  # a bad per-run setting fails now, not an hour into the study
        build(TrainConfig, {**dataclasses.asdict(cfg.train), **run.train}, f"{path}: strategy '{run.key}': train")
        for key, allowed in (("seeds", cfg.seeds), ("adapt_tokens", cfg.budgets)):
            extra = set(getattr(run, key) or ()) - set(allowed)
            if extra:
                raise UserError(f"{path}: strategy '{run.key}': '{key}' has {sorted(extra)}, not among the study's "
                                f"{allowed}")
    return cfg


def check_growth(cfg: StudyConfig, path) -> None:
    if not cfg.grow:
        raise UserError(f"{path}: 'grow' lists no domain; name the domains to add after new_domain, or drop the key")
    if len(set(cfg.domains)) != len(cfg.domains):
        raise UserError(f"{path}: 'grow' must name each domain once, and neither old_domain nor new_domain: "
                        f"{cfg.domains}")
    if len(cfg.budgets) != 1:
        raise UserError(f"{path}: 'adapt_tokens' must be one budget in a growth study ('grow'), not {cfg.adapt_tokens}")
    for run in cfg.strategies:
        produces = FORMATS[method_class(run.name).format]
        if not (produces.one_set_of_weights or produces.serves_old_from_base):
            raise UserError(f"{path}: strategies: '{run.key}': a {run.name} model cannot be adapted again, so it "
                            "cannot grow ('grow'); drop it from this study")


class Study:
    def __init__(self, cfg: StudyConfig, out: Path, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
        self.sources = {}
        for name in cfg.domains:
            self.sources[name] = get_domain(name).local_files(data_dir)
        self.cache = str(self.out / "cache")
        self._classifier = None
        self._val = {}

    def val_corpus(self, name: str):
        """A domain's validation documents (read once per study)."""
        if name not in self._val:  # the validation file, or the slice the runs held out when there is none
            (train, val), domain = self.sources[name], get_domain(name)
            self._val[name] = (load_corpus(val, domain, "validation", self.cfg.val_limit) if val else
                               load_train_val(train, domain, None, self.cfg.limit, self.cfg.val_limit)[1])
        return self._val[name]

    # -- training stages (each reused when done, resumed when interrupted) --------------------------
    def _train_cfg(self, seed: int, tokens: int, run: StrategyRun | None = None) -> TrainConfig:
        merged = {**dataclasses.asdict(self.cfg.train), **(run.train if run else {}),
                  "max_tokens": tokens, "seed": seed, "progress": self.progress}
        return build(TrainConfig, merged, f"strategy '{run.key}': train" if run else "train")

    def expert(self, domain: str, folder: Path, seed: int, tokens: int, tokenizer: str | None = None) -> Path:
        state = RunFolder(folder).auto()
        if state == "done":
            return folder
        data, val = self.sources[domain]
        log(f"== {folder.relative_to(self.out)}: {domain} expert ({state})")
        spec = ExpertSpec(domain=domain, data=data, val_data=val, out=str(folder), preset=self.cfg.preset,
                          tokenizer=tokenizer, limit=self.cfg.limit, val_limit=self.cfg.val_limit, cache_dir=self.cache,
                          train=self._train_cfg(seed, tokens))
        train_expert(spec, resume=state == "resume")
        return folder

    def adapted(self, run: StrategyRun, base: Path, folder: Path, seed: int, tokens: int, domain: str | None = None) -> Path:
        state = RunFolder(folder).auto()
        if state == "done":
            return folder
        domain = domain or self.cfg.new_domain
        data, val = self.sources[domain]
        log(f"== {folder.relative_to(self.out)}: {run.key} +{domain} ({state})")
        spec = AdaptSpec(base=str(base), strategy=run.name, domain=domain, data=data, val_data=val,
                         out=str(folder), options=run.options, expand_vocab=run.expand_vocab, limit=self.cfg.limit,
                         val_limit=self.cfg.val_limit, cache_dir=self.cache,
                         train=self._train_cfg(seed, tokens, run))
        adapt(spec, resume=state == "resume")
        return folder

    # -- evaluation suite ---------------------------------------------------------------------------
    def classifier(self) -> DomainClassifier:
        """The held-out judge: trained on real training text of both domains, never on generated text."""
        path = self.out / "classifier.joblib"
        if self._classifier is None:
            if path.exists():
                self._classifier = DomainClassifier.load(path)
            else:
                docs = self.cfg.evaluation.classifier_docs
                texts = {name: load_corpus(data, get_domain(name), limit=docs).documents
                         for name, (data, _) in self.sources.items()}
                self._classifier = DomainClassifier().fit(texts, seed=0)
                self._classifier.save(path)
        return self._classifier

    def suite(self, folder: Path) -> dict:
        """bpb on every domain of the study, and for every domain the model serves: samples, control
        accuracy, structural validity (domains with a check), text health. Cached in `folder/suite.json`."""
        cached = folder / SUITE
        if cached.exists():
            return read_json(cached)
        served = load_served(folder)
        known = RunFolder(folder).record()["bpb"]  # the run measured its own domains on the same sets
        result = {"bpb": {}, "samples": {}, "validity": {}, "health": {}}
        # a growth study measures the domains a model serves; a domain not added yet is not one of them
        for name in (served.domains if self.cfg.grow else self.sources):
            if name in known:
                result["bpb"][name] = known[name]
                continue
            model = served.for_domain(name) if name in served.domains else served.model
            shard = build_shard(self.val_corpus(name), served.tokenizer_for(name), self.cache,
                                foreign=name not in served.domains)
            result["bpb"][name] = evaluate_bpb(model, shard)["bpb"]
        ev = self.cfg.evaluation
        sampling = SamplingConfig(temperature=ev.temperature, max_new_tokens=ev.max_new_tokens, seed=0)
        for name in served.domains:
            domain = get_domain(name)
            drawn = generate(served.decode_model(name), served.tokenizer_for(name), domain, "", ev.samples, sampling)
            result["samples"][name] = [{"text": s.text, "finished": s.finished} for s in drawn]
            if domain.check is not None:
                result["validity"][name] = validity(domain, [(s.text, s.finished) for s in drawn])
            result["health"][name] = text_health([(s.text, s.finished) for s in drawn])
        texts = {d: [s["text"] for s in v] for d, v in result["samples"].items()}
        result["domain_accuracy"] = domain_control_accuracy(self.classifier(), texts) if texts else {}
        write_json(cached, result)
        return result

    # -- the study ----------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.cfg.grow:
            return self.run_growth()
        started = time.time()
        cfg, old, new = self.cfg, self.cfg.old_domain, self.cfg.new_domain
        rows = []
        # budget by budget, so the smaller (cheaper) points of every seed come first
        for tokens in cfg.budgets:
            for seed in cfg.seeds:
                runs = cfg.runs_at(seed, tokens)
                if not runs and tokens != cfg.budgets[0]:
                    continue
                root = self.out / f"seed{seed}"
                where = root if len(cfg.budgets) == 1 else root / budget_label(tokens)
                base = self.expert(old, root / f"expert-{old}", seed, cfg.base_tokens)
                scratch = self.expert(new, where / f"expert-{new}", seed, tokens)
                adapted = {run.key: self.adapted(run, base, where / run.key, seed, tokens) for run in runs}
                base_suite, scratch_suite = self.suite(base), self.suite(scratch)
                before, reference = base_suite["bpb"][old], scratch_suite["bpb"][new]
                row = functools.partial(self._row, seed=seed, before=before, reference=reference, tokens=tokens)
                if tokens == cfg.budgets[0]:
                    rows.append(row("base", f"{old} expert (before)", base, base_suite))
                rows.append(row("scratch", f"{new} expert (reference)", scratch, scratch_suite, forgetting=False))
                rows += [row(run.name, run.key, adapted[run.key], self.suite(adapted[run.key])) for run in runs]
        return self._finish(rows, started, write_study_report)

    def run_growth(self) -> dict:
        """Every strategy adds the domains one after another; each step is evaluated on every domain it serves."""
        started = time.time()
        cfg, old, tokens = self.cfg, self.cfg.old_domain, self.cfg.budgets[0]
        rows = []
        for seed in cfg.seeds:
            root = self.out / f"seed{seed}"
            experts = {old: self.expert(old, root / f"expert-{old}", seed, cfg.base_tokens),
                       **{d: self.expert(d, root / f"expert-{d}", seed, tokens) for d in cfg.added}}
            reference = {d: self.suite(folder)["bpb"][d] for d, folder in experts.items()}
            row = functools.partial(self._growth_row, seed=seed, reference=reference)
            rows.append(row("base", f"{old} expert (step 0)", experts[old], step=0, added_at={}))
            rows += [row("scratch", f"{d} expert (reference)", experts[d], step=None, added_at={}) for d in cfg.added]
            for run in cfg.runs_at(seed, tokens):
                base, added_at = experts[old], {old: reference[old]}
                for step, domain in enumerate(cfg.added, 1):
                    base = self.adapted(run, base, root / run.key / f"{step}-{domain}", seed, tokens, domain)
                    rows.append(row(run.name, run.key, base, step=step, added_at=added_at))
                    added_at[domain] = rows[-1]["bpb"][domain]
        return self._finish(rows, started, write_growth_report)

    def _finish(self, rows: list[dict], started: float, write_report) -> dict:
        """The tokenizer study (if asked), then `results.json` and the report of a finished study."""
        tokenizer_rows = self.tokenizer_study(self.cfg.seeds[0]) if self.cfg.tokenizer_study else []
        results = {"config": dataclasses.asdict(self.cfg), "versions": versions(), "models": rows,
                   "tokenizer_study": tokenizer_rows, "seconds": round(time.time() - started, 1)}
        write_json(self.out / "results.json", results)
        write_report(self.out, results)
        return results

    def _growth_row(self, strategy, label, folder, seed, step, reference, added_at) -> dict:
        """One model of a growth study: bpb per domain it serves, forgetting of each domain against its bpb
        at the step that added it, and the gap of each against its scratch expert."""
        record, suite = RunFolder(folder).record(), self.suite(folder)
        bpb = suite["bpb"]
        params = record.get("total_params", record.get("params"))
        return {
            "strategy": strategy, "label": label, "seed": seed, "step": step,
            "added": (RunFolder(folder).card().domains or [None])[-1], "model": str(folder.relative_to(self.out)),
            "bpb": bpb,
            "forgetting": {d: bpb[d] - v for d, v in added_at.items() if d in bpb},
            "forgetting_rel": {d: (bpb[d] - v) / v for d, v in added_at.items() if d in bpb},
            "gap": {d: v / reference[d] - 1 for d, v in bpb.items()},
            "domain_accuracy": suite.get("domain_accuracy", {}),
            "validity": suite.get("validity", {}),
            "validity_ceiling": {d: self.validity_ceiling(folder, d) for d in bpb if get_domain(d).check is not None},
            "health": suite.get("health", {}),
            "trainable_params": record.get("trainable_params", params), "total_params": params,
            "tokens": record.get("tokens"), "seconds": record.get("train_seconds"),
        }

    def validity_ceiling(self, folder: Path, name: str) -> float:
        """`suite.validity_ceiling` of `name`'s validation documents with the model's tokenizer."""
        run = RunFolder(folder)
        tok = load_tokenizer(tokenizer_folder(run, run.card(), name))
        return validity_ceiling(get_domain(name), self.val_corpus(name).documents, tok, context_length(folder))

    def _row(self, strategy, label, folder, suite, seed, before, reference, tokens, forgetting=True) -> dict:
        record = RunFolder(folder).record()
        old, new = self.cfg.old_domain, self.cfg.new_domain
        bpb = suite["bpb"]
        params = record.get("total_params", record.get("params"))
        return {
            "strategy": strategy, "label": label, "seed": seed, "adapt_tokens": tokens,
            "model": str(folder.relative_to(self.out)),
            "bpb": bpb,
            "forgetting": bpb[old] - before if forgetting else None,
            "forgetting_rel": (bpb[old] - before) / before if forgetting else None,
            "new_domain_gap": bpb[new] / reference - 1,
            "domain_accuracy": suite.get("domain_accuracy", {}),
            "validity": suite.get("validity", {}),
            "validity_ceiling": {d: self.validity_ceiling(folder, d) for d in self.sources
                                 if get_domain(d).check is not None},
            "health": suite.get("health", {}),
            "trainable_params": record.get("trainable_params", params), "total_params": params,
            "tokens": record.get("tokens"), "seconds": record.get("train_seconds"),
        }

    def tokenizer_study(self, seed: int) -> list[dict]:
        """Finding 2 of the paper: the same model and training tokens, different tokenizers."""
        study, rows = self.cfg.tokenizer_study, []
        shared = self.out / "tokenizers" / "shared"
        if "shared" in study.tokenizers and not (shared / "tokenizer.json").exists():
            from ..model.llama import get_preset
            docs = []
            for name, (data, val) in self.sources.items():
                train_c, _ = load_train_val(data, get_domain(name), val, self.cfg.limit)
                docs += train_c.documents
            tags = [get_domain(name).tag for name in self.sources]  # the user's domains' too
            RunFolder(shared).save(train_bpe(docs, get_preset(self.cfg.preset).vocab, tags).save_pretrained)
        for name in self.sources:
            for kind in study.tokenizers:
                spec = {"custom": None, "shared": str(shared), "gpt2": "gpt2", "bytes": "bytes"}.get(kind, kind)
                folder = self.out / "tokenizer-study" / f"{name}-{kind}"
                self.expert(name, folder, seed, study.tokens, tokenizer=spec)
                record = RunFolder(folder).record()
                tok = load_tokenizer(folder)
                rows.append({"domain": name, "tokenizer": kind, "vocab": len(tok), "params": record["params"],
                             "tokens": record["tokens"], "bytes_per_token": round(
                                 record["data"]["train"]["bytes"] / record["data"]["train"]["tokens"], 3),
                             "bpb": record["val_bpb"], "seconds": record["train_seconds"]})
        return rows
