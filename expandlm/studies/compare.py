"""The cross-domain study in one command: `expandlm compare CONFIG.yaml --out DIR`.

For each seed: train the old domain's expert (the base) and the new domain's scratch expert (the
reference), adapt the base with every strategy of the config at equal training tokens on the new
domain, then run the evaluation suite (stages.py; docs/DESIGN.md, "Metrics") on every model.
Optionally a tokenizer study (per-domain BPE vs shared BPE vs GPT-2 vs bytes, equal model and tokens).
Every stage writes its own folder and is reused when finished (resumed when interrupted), so a killed
study continues where it stopped. Writes `results.json`, `report.md`, plots and sample generations.

With `grow` (a growth study), every strategy adds the new domain, then each domain of `grow` in turn,
each step adapting the previous step's model of the same strategy; every domain gets a scratch expert
as reference, and every step is evaluated on every domain it serves (`growth.png`, one table).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

from ..adapt import method_class
from ..config import arg, build, config
from ..data.corpus import load_train_val
from ..data.tokenizer import load_tokenizer, train_bpe
from ..domains import get_domain, is_spec_path
from ..errors import UserError
from ..formats import FORMATS
from ..run_folder import RunFolder
from ..training.loop import TrainConfig
from .report import write_growth_report, write_study_report
from .stages import EvalConfig, Stages


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


def load_config(data: dict, path: str | Path) -> StudyConfig:
    """The two-domain (or growth) study's config from `data`, the YAML read from `path` without its `study` key."""
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


def against_base(bpb: dict, old: str, new: str, before: float, reference: float, forgetting: bool = True) -> dict:
    """A two-domain row's comparisons: the old domain's bpb change since the base (None where the model never
    served the old domain: the new domain's scratch expert) and the new domain's gap to its scratch expert."""
    return {"forgetting": bpb[old] - before if forgetting else None,
            "forgetting_rel": (bpb[old] - before) / before if forgetting else None,
            "new_domain_gap": bpb[new] / reference - 1}


def against_steps(bpb: dict, added_at: dict, reference: dict) -> dict:
    """A growth row's comparisons: each domain's bpb change since the step that added it (`added_at`: its bpb
    then), and each domain's gap to its scratch expert (`reference`: their bpb)."""
    return {"forgetting": {d: bpb[d] - v for d, v in added_at.items() if d in bpb},
            "forgetting_rel": {d: (bpb[d] - v) / v for d, v in added_at.items() if d in bpb},
            "gap": {d: v / reference[d] - 1 for d, v in bpb.items()}}


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


class Study(Stages):
    """The two-domain study, or with `grow` the growth study (see the module's docstring)."""

    def __init__(self, cfg: StudyConfig, out: Path, progress: bool = True):
        super().__init__(cfg, out, progress, served_bpb_only=bool(cfg.grow))
        self.cfg = cfg

    def _adapted(self, run: StrategyRun, base: Path, folder: Path, seed: int, tokens: int, domain: str) -> Path:
        train = self.train_config(seed, tokens, run.train, f"strategy '{run.key}': train")
        return self.adapted(base, folder, domain, run.name, train, run.options, run.expand_vocab, label=run.key)

    def run(self) -> dict:
        if self.cfg.grow:
            return self.run_growth()
        started, cfg = time.time(), self.cfg
        rows = []
        # budget by budget, so the smaller (cheaper) points of every seed come first
        for tokens in cfg.budgets:
            for seed in cfg.seeds:
                runs = cfg.runs_at(seed, tokens)
                if runs or tokens == cfg.budgets[0]:
                    rows += self._budget_point(seed, tokens, runs)
        return self._finish(rows, started, write_study_report)

    def _budget_point(self, seed: int, tokens: int, runs: list[StrategyRun]) -> list[dict]:
        """The rows of one seed at one budget: the base (at the first budget only), the new domain's scratch
        expert, and every strategy's run, each compared with the base and the scratch expert."""
        cfg, old, new = self.cfg, self.cfg.old_domain, self.cfg.new_domain
        root = self.out / f"seed{seed}"
        where = root if len(cfg.budgets) == 1 else root / budget_label(tokens)
        base = self.expert(old, root / f"expert-{old}", seed, cfg.base_tokens)
        scratch = self.expert(new, where / f"expert-{new}", seed, tokens)
        adapted = {run.key: self._adapted(run, base, where / run.key, seed, tokens, new) for run in runs}
        before, reference = self.suite(base)["bpb"][old], self.suite(scratch)["bpb"][new]

        def row(strategy, label, folder, forgetting=True):
            compared = functools.partial(against_base, old=old, new=new, before=before, reference=reference,
                                         forgetting=forgetting)
            return self._row(strategy, label, folder, seed, {"adapt_tokens": tokens}, compared)

        rows = [row("base", f"{old} expert (before)", base)] if tokens == cfg.budgets[0] else []
        rows.append(row("scratch", f"{new} expert (reference)", scratch, forgetting=False))
        return rows + [row(run.name, run.key, adapted[run.key]) for run in runs]

    def run_growth(self) -> dict:
        """Every strategy adds the domains one after another; each step is evaluated on every domain it serves."""
        started, cfg, old, tokens = time.time(), self.cfg, self.cfg.old_domain, self.cfg.budgets[0]
        rows = []
        for seed in cfg.seeds:
            root = self.out / f"seed{seed}"
            experts = {old: self.expert(old, root / f"expert-{old}", seed, cfg.base_tokens),
                       **{d: self.expert(d, root / f"expert-{d}", seed, tokens) for d in cfg.added}}
            reference = {d: self.suite(folder)["bpb"][d] for d, folder in experts.items()}

            def row(strategy, label, folder, step, added_at):
                position = {"step": step, "added": (RunFolder(folder).card().domains or [None])[-1]}
                compared = functools.partial(against_steps, added_at=added_at, reference=reference)
                return self._row(strategy, label, folder, seed, position, compared)

            rows.append(row("base", f"{old} expert (step 0)", experts[old], step=0, added_at={}))
            rows += [row("scratch", f"{d} expert (reference)", experts[d], step=None, added_at={}) for d in cfg.added]
            for run in cfg.runs_at(seed, tokens):
                base, added_at = experts[old], {old: reference[old]}
                for step, domain in enumerate(cfg.added, 1):
                    base = self._adapted(run, base, root / run.key / f"{step}-{domain}", seed, tokens, domain)
                    rows.append(row(run.name, run.key, base, step=step, added_at=added_at))
                    added_at[domain] = rows[-1]["bpb"][domain]
        return self._finish(rows, started, write_growth_report)

    def _finish(self, rows: list[dict], started: float, write_report) -> dict:
        """The tokenizer study (if asked), then `results.json` and the report of a finished study."""
        tokenizer_rows = self.tokenizer_study(self.cfg.seeds[0]) if self.cfg.tokenizer_study else []
        return self.finish({"models": rows, "tokenizer_study": tokenizer_rows}, started, write_report)

    def _row(self, strategy, label, folder: Path, seed: int, position: dict, compared) -> dict:
        """One model of the study: where it stands (`position`: its budget, or its growth step), its bpb on
        every domain measured, `compared(bpb)` (its forgetting and gap, as the study defines them), and the
        suite's other measures (validity ceilings for every measured domain with a check)."""
        record, suite = RunFolder(folder).record(), self.suite(folder)
        bpb = suite["bpb"]
        return {
            "strategy": strategy, "label": label, "seed": seed, **position, "model": self.relative(folder),
            "bpb": bpb, **compared(bpb),
            "domain_accuracy": suite.get("domain_accuracy", {}),
            "validity": suite.get("validity", {}),
            "validity_ceiling": {d: self.validity_ceiling(folder, d) for d in bpb if get_domain(d).check is not None},
            "health": suite.get("health", {}),
            "trainable_params": record.trainable_params, "total_params": record.total_params,
            "tokens": record.tokens, "seconds": record.train_seconds,
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
                tok, data = load_tokenizer(folder), record.details["data"]["train"]
                rows.append({"domain": name, "tokenizer": kind, "vocab": len(tok), "params": record.total_params,
                             "tokens": record.tokens, "bytes_per_token": round(data["bytes"] / data["tokens"], 3),
                             "bpb": record.bpb[name], "seconds": record.train_seconds})
        return rows
