"""Combining experts, one study: `expandlm compare configs/combine.yaml --out DIR`.

From a common start (the base domain's expert; with `mix_base`, also a model trained from scratch on
every domain mixed), each domain of `experts` is fine-tuned once, fully and (from the base expert) as
a LoRA adapter. Then every way of getting one model, or one service, for all the domains is measured
on every domain at once:

- merges (`merge/`): linear, task arithmetic, TIES, DARE, Fisher, RegMean, of the full fine-tunes
  or of the adapters (`of: lora`), and PEFT's Arrow, which keeps the adapters and routes each token;
- routing per request among the experts kept apart (the domain router on each validation document's
  opening, then that expert on the document), against the oracle (always the right expert);
- distillation (`training/distill.py`): one student of the expert's size on the experts' soft
  targets, against joint training on the real data of the same windows at equal tokens (alpha 0).

Every row: bpb on every domain and its gap to that domain's expert, domain-control accuracy of
samples, parameters trained and stored, wall time. Stages are folders, reused when done.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Literal

from ..atomic import read_json, write_json
from ..config import arg, build, config
from ..data.corpus import Corpus
from ..data.shards import build_shard
from ..domains import get_domain
from ..errors import UserError
from ..evaluation.bpb import evaluate_bpb
from ..formats.served import load_served
from ..merge.run import METHODS, MergeConfig, MergeModel, MergeParameters, merge
from ..routing.router import route, router_from_data
from ..run_folder import RUN_RECORD, RunFolder
from ..training.distill import DistillSpec, Teacher, distill
from ..process import log
from ..training.loop import TrainConfig
from .report import write_combine_report
from .stages import EvalConfig, Stages


@config
class MergeRun:
    label: str = arg(help="the row's name")
    method: Literal[METHODS] = arg(help="a merge method of `expandlm merge`")
    of: Literal["full", "lora"] = arg("full", "merge the full fine-tunes or the LoRA adapters (base expert only)")
    weight: float = arg(1.0, "every expert's weight")
    parameters: dict = arg(help="the method's parameters (merge.MergeParameters)", factory=dict)


@config
class DistillRun:
    alpha: float = arg(1.0, "weight of the teachers' soft targets (the control is always alpha 0)")
    temperature: float = arg(1.0, "softmax temperature of the soft targets")


@config
class CombineStudyConfig:
    base_domain: str = arg(help="the common start: this domain's expert")
    experts: list[str] = arg(help="the domains fine-tuned once each from the common start", factory=list)
    mix_base: bool = arg(False, "also start from a model trained from scratch on every domain mixed (full merges)")
    preset: str = arg("tiny", "model size of every model")
    seed: int = arg(0, "seed of every run")
    data_dir: str | None = arg(None, "folder with the corpora (default: $EXPANDLM_DATA or ../shared/data)")
    limit: int | None = arg(None, "first N documents of each corpus")
    val_limit: int | None = arg(None, "first N documents of each validation set (None: all)")
    base_tokens: int = arg(2_000_000, "training tokens of the base expert and of the mixed base")
    expert_tokens: int = arg(500_000, "training tokens of each fine-tune")
    joint_tokens: int | None = arg(None, "tokens of the student and of joint training (default: expert_tokens "
                                         "× number of experts: what the fine-tunes used together)")
    lora: dict = arg(help="options of the LoRA fine-tunes", factory=lambda: {"r": 16, "alpha": 32})
    train: TrainConfig = arg(help="training loop settings of every run", factory=TrainConfig)
    merges: list[MergeRun] = arg(help="the merges", factory=list)
    distill: DistillRun | None = arg(None, "distil the experts into one student (and its joint control)")
    routing_chars: int = arg(200, "characters of each validation document the per-request router reads")
    evaluation: EvalConfig = arg(help="the evaluation suite", factory=EvalConfig)

    @property
    def domains(self) -> list[str]:
        return [self.base_domain, *self.experts]


def load_combine_config(data: dict, path) -> CombineStudyConfig:
    """The combination study's config from `data`, the YAML read from `path` without its `study` key."""
    cfg = build(CombineStudyConfig, data, str(path))
    cfg.base_domain, cfg.experts = get_domain(cfg.base_domain).name, [get_domain(d).name for d in cfg.experts]
    if not cfg.experts or cfg.base_domain in cfg.experts or len(set(cfg.experts)) != len(cfg.experts):
        raise UserError(f"{path}: 'experts' must name at least one domain, each once, other than base_domain "
                        f"'{cfg.base_domain}': {cfg.experts}")
    labels = [m.label for m in cfg.merges]
    if len(set(labels)) != len(labels):
        raise UserError(f"{path}: merges: two merges share a label: {labels}")
    for i, m in enumerate(cfg.merges):
        build(MergeParameters, m.parameters, f"{path}: merges[{i}] ({m.label}): parameters")
        if m.method == "arrow" and m.of != "lora":
            raise UserError(f"{path}: merges[{i}] ({m.label}): arrow routes among adapters; set 'of: lora'")
    return cfg


def stored_params(folder: Path) -> int:
    """Parameters kept on disk to serve a folder: its weight files, and its base's for adapters."""
    from safetensors import safe_open

    total = 0
    for path in Path(folder).rglob("*.safetensors"):
        if "checkpoint" not in path.relative_to(folder).parts:
            with safe_open(path, "pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    card = RunFolder(folder).card()
    if card.base and not (Path(folder) / "config.json").exists():  # an adapter's base is stored too
        total += stored_params(RunFolder(folder).path / card.base)
    return total


@dataclasses.dataclass
class FineTunes:
    """The common start and its fine-tunes: what the rows of the combination study are made of and
    measured against."""
    base: Path                    # the base domain's expert
    full: dict[str, Path]         # each expert domain's full fine-tune
    lora: dict[str, Path]         # ... and its LoRA adapter (none when no merge asks for adapters)
    experts: dict[str, Path]      # each domain's expert: the base for its domain, the full fine-tunes for theirs
    reference: dict[str, float]   # each domain's bpb by its expert
    base_params: int              # parameters stored to serve one full model
    seconds: dict[str, float]     # training seconds of each fine-tune: "recipes", "recipes-lora"


class CombineStudy(Stages):
    """The combination study (see the module's docstring)."""

    def __init__(self, cfg: CombineStudyConfig, out: Path, progress: bool = True):
        super().__init__(cfg, out, progress)
        self.cfg = cfg

    def _tokens(self) -> int:
        return self.cfg.joint_tokens or self.cfg.expert_tokens * len(self.cfg.experts)

    def _fine_tune(self, base: Path, domain: str, strategy: str, folder: Path, options: dict) -> Path:
        train = self.train_config(self.cfg.seed, self.cfg.expert_tokens)
        return self.adapted(base, folder, domain, strategy, train, options)

    def _distill(self, folder: Path, teachers: dict[str, Path], tokens: int, alpha: float, student: Path | None,
                 temperature: float = 1.0) -> Path:
        state = RunFolder(folder).auto()
        if state != "done":
            log(f"== {self.relative(folder)}: {'distil' if alpha else 'train'} on "
                f"{', '.join(teachers)} ({state})")
            distill(DistillSpec(out=str(folder), teachers=[Teacher(model=str(m), domain=d) for d, m in teachers.items()],
                                student=str(student) if student else None, alpha=alpha, temperature=temperature,
                                limit=self.cfg.limit, val_limit=self.cfg.val_limit, cache_dir=self.cache,
                                train=self.train_config(self.cfg.seed, tokens)), resume=state == "resume")
        return folder

    def _merge(self, run: MergeRun, models: list[Path], base: Path, folder: Path) -> tuple[Path, float]:
        timing = folder / "merge_seconds.json"
        if not (folder / RUN_RECORD).exists() or not timing.exists():
            RunFolder(folder).restart()  # a merge killed midway is done again
            t0 = time.time()
            cfg = MergeConfig(method=run.method, base=str(base), parameters=build(MergeParameters, run.parameters, run.label),
                              models=[MergeModel(model=str(m), weight=run.weight) for m in models])
            merge(cfg, folder)
            write_json(timing, {"seconds": round(time.time() - t0, 2)})
        return folder, read_json(timing)["seconds"]

    # -- the rows -------------------------------------------------------------------------------------
    def _gaps(self, bpb: dict, reference: dict) -> dict:
        return {d: round(100 * (bpb[d] - reference[d]) / reference[d], 2) for d in reference if d in bpb}

    def _row(self, label, family, base, bpb, accuracy, trained, stored, seconds, reference, **extra) -> dict:
        acc = [v for v in accuracy.values() if v is not None]
        return {"label": label, "family": family, "base": base, "bpb": bpb, "gap": self._gaps(bpb, reference),
                "mean_gap": round(sum(self._gaps(bpb, reference).values()) / len(reference), 2),
                "domain_accuracy": accuracy, "mean_accuracy": sum(acc) / len(acc) if acc else None,
                "trained_params": trained, "stored_params": stored, "seconds": seconds, **extra}

    def _folder_row(self, label, family, base, folder, reference, trained=None, stored=None, seconds=None, **extra):
        suite, record = self.suite(folder), RunFolder(folder).record()
        if trained is None:
            trained = record.trainable_params or 0  # a merge trains nothing
        if stored is None:
            stored = stored_params(folder)
        if seconds is None:
            seconds = record.train_seconds
        return self._row(label, family, base, suite["bpb"], suite.get("domain_accuracy", {}), trained, stored, seconds,
                         reference, samples=suite.get("samples", {}), folder=self.relative(folder), **extra)

    def _routed(self, experts: dict[str, Path]) -> tuple[dict, float]:
        """bpb of each domain when each validation document goes to the expert the router picks from its
        opening characters; and the share of documents routed to their own domain's expert."""
        served = {d: load_served(f, device="cpu") for d, f in experts.items()}
        router = router_from_data({d: s.domain_data()[d] for d, s in served.items()})
        bpb, right, total = {}, 0, 0
        for d in experts:
            docs = self.val_corpus(d).documents
            picks = [route(doc[:self.cfg.routing_chars], router).domain for doc in docs]
            right, total = right + sum(p == d for p in picks), total + len(docs)
            nats = nbytes = 0.0
            for chosen in sorted(set(picks)):
                subset = [doc for doc, p in zip(docs, picks) if p == chosen]
                fingerprint = hashlib.sha256("\0".join(subset).encode()).hexdigest()[:16]
                corpus = Corpus(get_domain(d), f"{d}-routed-to-{chosen}", subset, fingerprint)
                s = served[chosen]
                model = s.for_domain(d) if d in s.domains else s.model
                result = evaluate_bpb(model, build_shard(corpus, s.tokenizer_for(d), self.cache))
                nats, nbytes = nats + result["nats"], nbytes + result["bytes"]
            bpb[d] = nats / math.log(2) / nbytes
        return bpb, right / total

    def run(self) -> dict:
        started, cfg = time.time(), self.cfg
        tuned = self._fine_tunes()
        rows = self._expert_rows(tuned) + self._routing_rows(tuned) + self._merge_rows(tuned)
        if cfg.distill is not None:
            rows += self._distill_rows(tuned)
        if cfg.mix_base:
            rows += self._mixed_base_rows(tuned)
        return self.finish({"reference": tuned.reference, "domains": cfg.domains, "models": rows}, started,
                           write_combine_report)

    def _fine_tunes(self) -> FineTunes:
        """The base expert, then each domain's full fine-tune and (when a merge of adapters asks) its LoRA."""
        cfg, out = self.cfg, self.out
        base = self.expert(cfg.base_domain, out / f"expert-{cfg.base_domain}", cfg.seed, cfg.base_tokens)
        full = {d: self._fine_tune(base, d, "full_ft", out / f"{d}-full_ft", {}) for d in cfg.experts}
        needs_lora = any(m.of == "lora" for m in cfg.merges)
        lora = {d: self._fine_tune(base, d, "lora", out / f"{d}-lora", cfg.lora) for d in cfg.experts} if needs_lora else {}
        experts = {cfg.base_domain: base, **full}  # each domain's expert: the reference of every row
        trained = {**full, **{f"{d}-lora": f for d, f in lora.items()}}
        return FineTunes(base=base, full=full, lora=lora, experts=experts,
                         reference={d: self.suite(f)["bpb"][d] for d, f in experts.items()},
                         base_params=stored_params(base),
                         seconds={d: RunFolder(f).record().train_seconds or 0 for d, f in trained.items()})

    def _tag(self) -> str:
        return f"{self.cfg.base_domain} expert"

    def _expert_seconds(self, tuned: FineTunes) -> float:
        """What training the full fine-tunes took: part of the cost of every row made of them."""
        return sum(tuned.seconds[d] for d in self.cfg.experts)

    def _expert_rows(self, tuned: FineTunes) -> list[dict]:
        """The base expert and every fine-tune, each on every domain."""
        cfg, tag, reference = self.cfg, self._tag(), tuned.reference
        rows = [self._folder_row(f"{cfg.base_domain} expert (the base)", "expert", tag, tuned.base, reference)]
        for d in cfg.experts:
            rows.append(self._folder_row(f"{d} full fine-tune", "expert", tag, tuned.full[d], reference))
            if tuned.lora:
                rows.append(self._folder_row(f"{d} LoRA", "expert", tag, tuned.lora[d], reference, stored=None))
        return rows

    def _routing_rows(self, tuned: FineTunes) -> list[dict]:
        """Routing among the experts kept apart: the oracle (always the right expert) and the per-request
        router, over the full experts; and the oracle over the LoRA experts."""
        cfg, tag, reference, experts = self.cfg, self._tag(), tuned.reference, tuned.experts
        suites = {d: self.suite(f) for d, f in experts.items()}
        oracle_bpb = {d: suites[d]["bpb"][d] for d in experts}
        oracle_acc = {d: suites[d].get("domain_accuracy", {}).get(d) for d in experts}
        stored_all, expert_seconds = tuned.base_params * len(experts), self._expert_seconds(tuned)
        rows = [self._row("oracle routing (full experts)", "routing", tag, oracle_bpb, oracle_acc, 0, stored_all,
                          expert_seconds, reference)]
        cached = self.out / "routed.json"
        if not cached.exists():
            t0 = time.time()
            bpb, accuracy = self._routed(experts)
            write_json(cached, {"bpb": bpb, "routing_accuracy": accuracy, "seconds": round(time.time() - t0, 1)})
        routed = read_json(cached)
        rows.append(self._row("per-request router (full experts)", "routing", tag, routed["bpb"], {}, 0, stored_all,
                              expert_seconds, reference, routing_accuracy=routed["routing_accuracy"]))
        if tuned.lora:
            lora_suites = {d: self.suite(f) for d, f in tuned.lora.items()}
            adapters = sum(RunFolder(f).record().trainable_params for f in tuned.lora.values())
            rows.append(self._row("oracle routing (LoRA experts)", "routing", tag,
                                  {cfg.base_domain: reference[cfg.base_domain],
                                   **{d: s["bpb"][d] for d, s in lora_suites.items()}},
                                  {cfg.base_domain: oracle_acc[cfg.base_domain],
                                   **{d: s.get("domain_accuracy", {}).get(d) for d, s in lora_suites.items()}},
                                  0, tuned.base_params + adapters,
                                  sum(tuned.seconds[f"{d}-lora"] for d in cfg.experts), reference))
        return rows

    def _merge_rows(self, tuned: FineTunes) -> list[dict]:
        """Every merge of the fine-tunes (or of the adapters) from the base expert."""
        cfg, rows = self.cfg, []
        for run in cfg.merges:
            models = tuned.lora if run.of == "lora" else tuned.full
            folder, merge_s = self._merge(run, [models[d] for d in cfg.experts], tuned.base,
                                          self.out / "merges" / run.label)
            own = sum(tuned.seconds[d if run.of == "full" else f"{d}-lora"] for d in cfg.experts)
            stored = None if run.method == "arrow" else (tuned.base_params if run.of == "full" else None)
            rows.append(self._folder_row(run.label, "arrow" if run.method == "arrow" else f"merge ({run.of})",
                                         self._tag(), folder, tuned.reference, trained=0, stored=stored,
                                         seconds=round(own + merge_s, 1), method=run.method, merge_seconds=merge_s))
        return rows

    def _distill_rows(self, tuned: FineTunes) -> list[dict]:
        """The student distilled from every expert, and its control: joint training on the same windows'
        real tokens (alpha 0), both continued from the base."""
        out, tag, reference, teachers = self.out, self._tag(), tuned.reference, tuned.experts
        joint = self._distill(out / "joint-continued", teachers, self._tokens(), 0.0, tuned.base)
        rows = [self._folder_row("joint training (continued from the base, real data)", "joint", tag, joint, reference)]
        student = self._distill(out / "distilled", teachers, self._tokens(), self.cfg.distill.alpha, tuned.base,
                                self.cfg.distill.temperature)
        record = RunFolder(student).record()
        rows.append(self._folder_row("distilled student (continued from the base)", "distill", tag, student,
                                     reference, seconds=round(record.train_seconds + self._expert_seconds(tuned), 1)))
        return rows

    def _mixed_base_rows(self, tuned: FineTunes) -> list[dict]:
        """The mixed base (trained from scratch on every domain), its fine-tune per expert domain, and the
        merges of the full fine-tunes over it."""
        cfg, out, reference, tag = self.cfg, self.out, tuned.reference, "mixed base"
        # the experts give only their data and tokenizer: alpha 0 asks no teacher
        mix = self._distill(out / "mix" / "base", tuned.experts, cfg.base_tokens, 0.0, None)
        rows = [self._folder_row("mixed base (every domain, from scratch)", "joint", tag, mix, reference)]
        mix_ft = {d: self._distill(out / "mix" / f"{d}-full_ft", {d: tuned.full[d]}, cfg.expert_tokens, 0.0, mix)
                  for d in cfg.experts}
        for d in cfg.experts:
            rows.append(self._folder_row(f"{d} fine-tune of the mixed base", "expert", tag, mix_ft[d], reference))
        mix_s = sum(RunFolder(f).record().train_seconds for f in mix_ft.values())
        for run in (r for r in cfg.merges if r.of == "full"):
            folder, merge_s = self._merge(run, [mix_ft[d] for d in cfg.experts], mix, out / "mix" / "merges" / run.label)
            rows.append(self._folder_row(f"{run.label} (mixed base)", "merge (full)", tag, folder, reference,
                                         trained=0, stored=tuned.base_params, seconds=round(mix_s + merge_s, 1),
                                         method=run.method, merge_seconds=merge_s))
        return rows
