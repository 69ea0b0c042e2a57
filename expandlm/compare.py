"""The cross-domain study in one command: `expandlm compare CONFIG.yaml --out DIR`.

For each seed: train the old domain's expert (the base) and the new domain's scratch expert (the
reference), adapt the base with every strategy of the config at equal training tokens on the new
domain, then run the evaluation suite (design.md §6) on every model. Optionally a tokenizer study
(per-domain BPE vs shared BPE vs GPT-2 vs bytes, equal model and tokens). Every stage writes its own
folder and is reused when finished (resumed when interrupted), so a killed study continues where it
stopped. Writes `results.json`, `report.md`, plots and sample generations.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .adapt import AdaptSpec, adapt
from .artifacts import read_json, versions, write_json_atomic
from .corpus import default_data_dir, load_corpus, load_train_val
from .domains import get_domain
from .errors import UserError
from .evaluate import evaluate_bpb
from .expert import RUN_RECORD, ExpertSpec, log, train_expert
from .generate import SamplingConfig, generate
from .report import write_study_report
from .serving import context_length, load_served
from .shards import build_shard
from .suite import DomainClassifier, domain_control_accuracy, recipe_validity, story_health
from .tokenizer import encode_texts, load_tokenizer, train_bpe
from .train import CHECKPOINT, TrainConfig

SUITE = "suite.json"


@dataclass
class StrategyRun:
    name: str
    label: str | None = None
    options: dict = field(default_factory=dict)
    expand_vocab: int = 0

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class EvalConfig:
    samples: int = 50              # generated samples per domain for control accuracy / validity / health
    max_new_tokens: int | None = None
    temperature: float = 0.8
    classifier_docs: int = 3000    # real training documents per domain for the held-out classifier


@dataclass
class TokenizerStudy:
    tokenizers: list = field(default_factory=lambda: ["custom", "shared", "gpt2", "bytes"])
    tokens: int = 500_000          # training tokens per model (equal for every tokenizer)


@dataclass
class StudyConfig:
    preset: str = "tiny"
    seeds: list = field(default_factory=lambda: [0])
    old_domain: str = "stories"
    new_domain: str = "recipes"
    data_dir: str | None = None    # default: $EXPANDLM_DATA or ../shared/data
    limit: int | None = None       # first N documents of each corpus
    val_limit: int | None = None   # first N documents of each validation set (None: all)
    base_tokens: int = 2_000_000   # the old domain's expert
    adapt_tokens: int = 1_000_000  # every strategy, and the new domain's scratch expert
    train: dict = field(default_factory=dict)  # TrainConfig overrides (batch_size, lr, ...)
    strategies: list = field(default_factory=list)
    tokenizer_study: TokenizerStudy | None = None
    evaluation: EvalConfig = field(default_factory=EvalConfig)


def _from_dict(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None


def load_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML ({getattr(e, 'problem', e)})") from None
    cfg = _from_dict(StudyConfig, raw or {}, str(path))
    cfg.strategies = [_from_dict(StrategyRun, s, f"{path}: strategies[{i}]") for i, s in enumerate(cfg.strategies)]
    if cfg.tokenizer_study is not None:
        cfg.tokenizer_study = _from_dict(TokenizerStudy, cfg.tokenizer_study, f"{path}: tokenizer_study")
    cfg.evaluation = _from_dict(EvalConfig, cfg.evaluation if isinstance(cfg.evaluation, dict) else {},
                                f"{path}: evaluation")
    _from_dict(TrainConfig, cfg.train, f"{path}: train")
    keys = [s.key for s in cfg.strategies]
    if len(set(keys)) != len(keys):
        raise UserError(f"{path}: strategies: two runs share a label; give each a distinct 'label'")
    for name in (cfg.old_domain, cfg.new_domain):
        get_domain(name)
    return cfg


def _clear_unresumable(folder: Path, state: str) -> None:
    """A stage killed before its first checkpoint left nothing worth keeping: start it again."""
    if state == "new" and folder.exists():
        shutil.rmtree(folder)


class Study:
    def __init__(self, cfg: StudyConfig, out: Path, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
        self.sources = {}
        for name in (cfg.old_domain, cfg.new_domain):
            d = get_domain(name)
            if data_dir is None or not (data_dir / d.train_file).exists():
                raise UserError(f"corpus for '{name}' not found in {data_dir}; set data_dir in the config")
            self.sources[name] = (str(data_dir / d.train_file), str(data_dir / d.valid_file))
        self.cache = str(self.out / "cache")
        self._classifier = None
        self._val = {}

    def val_corpus(self, name: str):
        """A domain's validation documents (read once per study)."""
        if name not in self._val:
            self._val[name] = load_corpus(self.sources[name][1], get_domain(name), "validation", self.cfg.val_limit)
        return self._val[name]

    # -- training stages (each reused when done, resumed when interrupted) --------------------------
    def _train_cfg(self, seed: int, tokens: int) -> TrainConfig:
        base = {"eval_interval": 50, "eval_docs": 100, **self.cfg.train}
        return TrainConfig(**{**base, "max_tokens": tokens, "seed": seed, "progress": self.progress})

    @staticmethod
    def _state(folder: Path) -> str:
        if (folder / RUN_RECORD).exists() and read_json(folder / RUN_RECORD).get("status") == "done":
            return "done"
        return "resume" if (folder / CHECKPOINT / "train_state.json").exists() else "new"

    def expert(self, domain: str, folder: Path, seed: int, tokens: int, tokenizer: str | None = None) -> Path:
        state = self._state(folder)
        if state == "done":
            return folder
        data, val = self.sources[domain]
        log(f"== {folder.relative_to(self.out)}: {domain} expert ({state})")
        spec = ExpertSpec(domain=domain, data=data, val_data=val, out=str(folder), preset=self.cfg.preset,
                          tokenizer=tokenizer, limit=self.cfg.limit, val_limit=self.cfg.val_limit, cache_dir=self.cache,
                          train=self._train_cfg(seed, tokens))
        _clear_unresumable(folder, state)
        train_expert(spec, resume=state == "resume")
        return folder

    def adapted(self, run: StrategyRun, base: Path, folder: Path, seed: int) -> Path:
        state = self._state(folder)
        if state == "done":
            return folder
        data, val = self.sources[self.cfg.new_domain]
        log(f"== {folder.relative_to(self.out)}: {run.key} ({state})")
        spec = AdaptSpec(base=str(base), strategy=run.name, domain=self.cfg.new_domain, data=data, val_data=val,
                         out=str(folder), options=run.options, expand_vocab=run.expand_vocab, limit=self.cfg.limit,
                         val_limit=self.cfg.val_limit, cache_dir=self.cache, train=self._train_cfg(seed, self.cfg.adapt_tokens))
        _clear_unresumable(folder, state)
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
        """bpb on both domains, and for every domain the model serves: samples, control accuracy,
        recipe validity, story health. Cached in `folder/suite.json`."""
        cached = folder / SUITE
        if cached.exists():
            return read_json(cached)
        served = load_served(folder)
        record = read_json(folder / RUN_RECORD)
        # the training run already measured its own domains on the same validation sets
        known = record.get("bpb") or {record["spec"]["domain"]: record["val_bpb"]}
        result = {"bpb": {}, "samples": {}}
        for name in self.sources:
            if name in known:
                result["bpb"][name] = known[name]
                continue
            model = served.for_domain(name) if name in served.domains else served.model
            shard = build_shard(self.val_corpus(name), served.tokenizer, self.cache)
            result["bpb"][name] = evaluate_bpb(model, shard)["bpb"]
        ev = self.cfg.evaluation
        sampling = SamplingConfig(temperature=ev.temperature, max_new_tokens=ev.max_new_tokens, seed=0)
        for name in served.domains:
            drawn = generate(served.for_domain(name), served.tokenizer, get_domain(name), "", ev.samples, sampling)
            result["samples"][name] = [{"text": s.text, "finished": s.finished} for s in drawn]
        texts = {d: [s["text"] for s in v] for d, v in result["samples"].items()}
        result["domain_accuracy"] = domain_control_accuracy(self.classifier(), texts) if texts else {}
        if "recipes" in result["samples"]:
            rs = result["samples"]["recipes"]
            result["recipe_validity"] = sum(recipe_validity(s["text"], s["finished"]) for s in rs) / len(rs)
        if "stories" in result["samples"]:
            result["story_health"] = story_health([(s["text"], s["finished"]) for s in result["samples"]["stories"]])
        write_json_atomic(cached, result)
        return result

    # -- the study ----------------------------------------------------------------------------------
    def run(self) -> dict:
        started = time.time()
        cfg, old, new = self.cfg, self.cfg.old_domain, self.cfg.new_domain
        rows = []
        for seed in cfg.seeds:
            root = self.out / f"seed{seed}"
            base = self.expert(old, root / f"expert-{old}", seed, cfg.base_tokens)
            scratch = self.expert(new, root / f"expert-{new}", seed, cfg.adapt_tokens)
            adapted = {run.key: self.adapted(run, base, root / run.key, seed) for run in cfg.strategies}
            base_suite, scratch_suite = self.suite(base), self.suite(scratch)
            before, reference = base_suite["bpb"][old], scratch_suite["bpb"][new]
            rows.append(self._row("base", f"{old} expert (before)", base, base_suite, seed, before, reference))
            rows.append(self._row("scratch", f"{new} expert (reference)", scratch, scratch_suite, seed, before,
                                  reference, forgetting=False))
            for run in cfg.strategies:
                suite = self.suite(adapted[run.key])
                rows.append(self._row(run.name, run.key, adapted[run.key], suite, seed, before, reference))
        tokenizer_rows = self.tokenizer_study(cfg.seeds[0]) if cfg.tokenizer_study else []
        results = {"config": dataclasses.asdict(cfg), "versions": versions(), "models": rows,
                   "tokenizer_study": tokenizer_rows, "seconds": round(time.time() - started, 1)}
        write_json_atomic(self.out / "results.json", results)
        write_study_report(self.out, results)
        return results

    def validity_ceiling(self, folder: Path) -> float:
        """Recipe validity of the real validation recipes, each counted as ended only if it fits the
        model's context with the model's tokenizer (request prefix and <|eos|> included): the most a
        perfect model could score at this context length."""
        tok = load_tokenizer(folder)
        context = context_length(folder)
        val_c = self.val_corpus("recipes")
        fits = [len(ids) + 3 <= context for ids in encode_texts(tok, val_c.documents)]
        return sum(recipe_validity(doc, ok) for doc, ok in zip(val_c.documents, fits)) / len(fits)

    def _row(self, strategy, label, folder, suite, seed, before, reference, forgetting=True) -> dict:
        record = read_json(folder / RUN_RECORD)
        old, new = self.cfg.old_domain, self.cfg.new_domain
        bpb = suite["bpb"]
        params = record.get("total_params", record.get("params"))
        return {
            "strategy": strategy, "label": label, "seed": seed, "model": str(folder.relative_to(self.out)),
            "bpb": bpb,
            "forgetting": bpb[old] - before if forgetting else None,
            "forgetting_rel": (bpb[old] - before) / before if forgetting else None,
            "new_domain_gap": bpb[new] / reference - 1,
            "domain_accuracy": suite.get("domain_accuracy", {}),
            "recipe_validity": suite.get("recipe_validity"),
            "recipe_validity_ceiling": self.validity_ceiling(folder) if "recipes" in self.sources else None,
            "story_health": suite.get("story_health"),
            "trainable_params": record.get("trainable_params", params), "total_params": params,
            "tokens": record.get("tokens"), "seconds": record.get("train_seconds"),
        }

    def tokenizer_study(self, seed: int) -> list[dict]:
        """Finding 2 of the paper: the same model and training tokens, different tokenizers."""
        study, rows = self.cfg.tokenizer_study, []
        shared = self.out / "tokenizers" / "shared"
        if "shared" in study.tokenizers and not (shared / "tokenizer.json").exists():
            from .model import get_preset
            docs = []
            for name, (data, val) in self.sources.items():
                train_c, _ = load_train_val(data, get_domain(name), val, self.cfg.limit)
                docs += train_c.documents
            train_bpe(docs, get_preset(self.cfg.preset).vocab).save_pretrained(shared)
        for name in self.sources:
            for kind in study.tokenizers:
                spec = {"custom": None, "shared": str(shared), "gpt2": "gpt2", "bytes": "bytes"}.get(kind, kind)
                folder = self.out / "tokenizer-study" / f"{name}-{kind}"
                self.expert(name, folder, seed, study.tokens, tokenizer=spec)
                record = read_json(folder / RUN_RECORD)
                tok = load_tokenizer(folder)
                rows.append({"domain": name, "tokenizer": kind, "vocab": len(tok), "params": record["params"],
                             "tokens": record["tokens"], "bytes_per_token": round(
                                 record["data"]["train"]["bytes"] / record["data"]["train"]["tokens"], 3),
                             "bpb": record["val_bpb"], "seconds": record["train_seconds"]})
        return rows
