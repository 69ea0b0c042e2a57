"""The stage runners every study shares: train an expert, adapt a model, evaluate a folder with the suite.

A study (compare.py, combine.py) is a set of stage folders under its `out` folder. Each stage is
reused when finished and resumed when interrupted, so a killed study continues where it stopped; the
suite's measures of a folder are cached in it (`suite.json`).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Protocol

from ..adapt.run import AdaptSpec, adapt
from ..atomic import read_json, write_json
from ..config import arg, build, config
from ..data.corpus import default_data_dir, load_corpus, load_train_val
from ..data.shards import build_shard
from ..data.tokenizer import load_tokenizer
from ..domains import get_domain
from ..evaluation.bpb import evaluate_bpb
from ..evaluation.suite import domain_control_accuracy, text_health, validity, validity_ceiling
from ..formats.served import context_length, load_served, tokenizer_folder
from ..inference.generate import SamplingConfig, generate
from ..routing.classifier import DomainClassifier
from ..run_folder import SUITE, RunFolder, versions
from ..process import log
from ..training.expert import ExpertSpec, train_expert
from ..training.loop import TrainConfig


@config
class EvalConfig:
    samples: int = arg(50, "generated samples per domain (control accuracy, validity, health)")
    max_new_tokens: int | None = arg(None, "tokens per sample (default: fill the context)")
    temperature: float = arg(0.8, "sampling temperature of the samples")
    classifier_docs: int = arg(3000, "real training documents per domain for the held-out classifier")


class StageSettings(Protocol):
    """The settings of a study config that its stages read (StudyConfig and CombineStudyConfig have them)."""
    preset: str
    data_dir: str | None
    limit: int | None
    val_limit: int | None
    train: TrainConfig
    evaluation: EvalConfig

    @property
    def domains(self) -> list[str]: ...


class Stages:
    """The stages of one study in `out`: the corpora of its domains, a token cache, the held-out classifier.

    `served_bpb_only`: the suite measures bpb on the domains a model serves (a growth study, where a domain
    not added yet is not one of them) instead of on every domain of the study."""

    def __init__(self, settings: StageSettings, out: Path, progress: bool = True, served_bpb_only: bool = False):
        self.settings, self.out, self.progress = settings, Path(out), progress
        RunFolder(self.out).claim()  # the study's stages, report and cache go here: never into a user's folder
        self.served_bpb_only = served_bpb_only
        data_dir = Path(settings.data_dir) if settings.data_dir else default_data_dir()
        self.sources = {name: get_domain(name).local_files(data_dir) for name in settings.domains}
        self.cache = str(self.out / "cache")
        self._classifier = None
        self._val = {}

    def relative(self, folder: Path) -> str:
        """A stage folder as results.json names it: relative to the study's folder."""
        return str(Path(folder).relative_to(self.out))

    def val_corpus(self, name: str):
        """A domain's validation documents (read once per study)."""
        if name not in self._val:  # the validation file, or the slice the runs held out when there is none
            (train, val), domain, s = self.sources[name], get_domain(name), self.settings
            self._val[name] = (load_corpus(val, domain, "validation", s.val_limit) if val else
                               load_train_val(train, domain, None, s.limit, s.val_limit)[1])
        return self._val[name]

    # -- training stages (each reused when done, resumed when interrupted) --------------------------
    def train_config(self, seed: int, tokens: int, overrides: dict | None = None, where: str = "train") -> TrainConfig:
        """The study's training settings with a stage's own `overrides`, its token budget and seed."""
        merged = {**dataclasses.asdict(self.settings.train), **(overrides or {}),
                  "max_tokens": tokens, "seed": seed, "progress": self.progress}
        return build(TrainConfig, merged, where)

    def expert(self, domain: str, folder: Path, seed: int, tokens: int, tokenizer: str | None = None) -> Path:
        """A domain's expert trained from scratch on `tokens` tokens in `folder`."""
        state = RunFolder(folder).auto()
        if state == "done":
            return folder
        (data, val), s = self.sources[domain], self.settings
        log(f"== {self.relative(folder)}: {domain} expert ({state})")
        spec = ExpertSpec(domain=domain, data=data, val_data=val, out=str(folder), preset=s.preset,
                          tokenizer=tokenizer, limit=s.limit, val_limit=s.val_limit, cache_dir=self.cache,
                          train=self.train_config(seed, tokens))
        train_expert(spec, resume=state == "resume")
        return folder

    def adapted(self, base: Path, folder: Path, domain: str, strategy: str, train: TrainConfig,
                options: dict | None = None, expand_vocab: int = 0, label: str | None = None) -> Path:
        """`base` adapted to `domain` by `strategy` in `folder`; `label` names the run in the log."""
        state = RunFolder(folder).auto()
        if state == "done":
            return folder
        (data, val), s = self.sources[domain], self.settings
        log(f"== {self.relative(folder)}: {label or strategy} +{domain} ({state})")
        spec = AdaptSpec(base=str(base), method=strategy, domain=domain, data=data, val_data=val,
                         out=str(folder), options=options or {}, expand_vocab=expand_vocab, limit=s.limit,
                         val_limit=s.val_limit, cache_dir=self.cache, train=train)
        adapt(spec, resume=state == "resume")
        return folder

    # -- evaluation suite ---------------------------------------------------------------------------
    def classifier(self) -> DomainClassifier:
        """The held-out judge: trained on real training text of every domain, never on generated text."""
        path = self.out / "classifier.joblib"
        if self._classifier is None:
            if path.exists():
                self._classifier = DomainClassifier.load(path)
            else:
                docs = self.settings.evaluation.classifier_docs
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
        result = {"bpb": self._bpb(folder, served), "samples": {}, "validity": {}, "health": {}}
        ev = self.settings.evaluation
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

    def _bpb(self, folder: Path, served) -> dict:
        """bpb of a served folder on each measured domain; its run already measured its own domains."""
        known = RunFolder(folder).record().bpb  # on the same validation sets
        bpb = {}
        for name in (served.domains if self.served_bpb_only else self.sources):
            if name in known:
                bpb[name] = known[name]
                continue
            model = served.for_domain(name) if name in served.domains else served.model
            shard = build_shard(self.val_corpus(name), served.tokenizer_for(name), self.cache,
                                foreign=name not in served.domains)
            bpb[name] = evaluate_bpb(model, shard)["bpb"]
        return bpb

    def validity_ceiling(self, folder: Path, name: str) -> float:
        """`suite.validity_ceiling` of `name`'s validation documents with the model's tokenizer."""
        run = RunFolder(folder)
        tok = load_tokenizer(tokenizer_folder(run, run.card(), name))
        return validity_ceiling(get_domain(name), self.val_corpus(name).documents, tok, context_length(folder))

    def finish(self, measured: dict, started: float, write_report) -> dict:
        """`results.json` (the config, the versions, what was `measured`, the wall time since `started`) and
        the report of a finished study."""
        results = {"config": dataclasses.asdict(self.settings), "versions": versions(), **measured,
                   "seconds": round(time.time() - started, 1)}
        write_json(self.out / "results.json", results)
        write_report(self.out, results)
        return results
