"""Distillation: one student learns several experts from their outputs (`expandlm distill`).

Each teacher is an expert of one domain. The student reads that domain's real training text, and its
next-token distribution is pulled toward the teacher's on the same window (KL at temperature T, the
soft targets of Hinton et al. 2015); `alpha` < 1 mixes in the plain next-token loss. With `alpha: 0`
the teachers are not consulted at all: the same windows, the same loop, the real next tokens only,
which is joint training on the real data at equal tokens (the study's control).

No maintained library trains a causal LM on several teachers chosen per window, so the loss is here;
the loop, checkpoints and resume are `loop.py`'s, the run's life `run.py`'s. Every teacher and the student share one tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from ..config import arg, config
from ..data.corpus import load_train_val
from ..data.shards import PackedBatches, build_shard
from ..domains import save_specs
from ..errors import UserError
from ..evaluation.bpb import evaluate_bpb
from ..formats.checkpoint import Checkpoint
from ..formats.served import check_tokenizers, load_served
from ..model.window import window
from ..model.llama import build_model, count_params, get_preset
from ..process import log
from ..records import ModelCard, RunRecord
from .loop import TrainConfig, batch_windows
from .run import Run


@config
class Teacher:
    model: str = arg(help="the expert's model folder")
    domain: str = arg(help="the domain it teaches (its data is the student's text for that domain)")


@config
class DistillSpec:
    out: str = arg(help="the student's run folder", path=True)
    teachers: list[Teacher] = arg(help="one expert per domain", factory=list, flag=False)
    student: str | None = arg(None, "continue this model folder (default: fresh weights of the teachers' "
                                    "architecture)", path=True)
    alpha: Annotated[float, Field(ge=0, le=1)] = arg(1.0, "weight of the teachers' soft targets; the rest is the "
                                                          "real next token (0: joint training, no teacher)")
    temperature: Annotated[float, Field(gt=0)] = arg(1.0, "softmax temperature of the soft targets")
    shares: list[float] | None = arg(None, "share of training windows per teacher's domain (default: equal)")
    limit: int | None = arg(None, "use only the first N training documents of each domain")
    val_limit: int | None = arg(None, "use only the first N validation documents of each domain")
    cache_dir: str | None = arg(None, "token shard cache (default: $EXPANDLM_CACHE or ~/.cache/expandlm)", path=True)
    train: TrainConfig = arg(help="training loop settings", factory=TrainConfig)


class LabelledBatches(PackedBatches):
    """Training windows with column 0 naming the shard (so the teacher) each came from: `train`
    hands the batch to the loss as it is."""

    def batch(self, micro_step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        rows = [np.concatenate([[k], np.asarray(self._tokens[k][start:start + self.context + 1], dtype=np.int64)])
                for k, start in self.picks(micro_step, rank, world)]
        return torch.from_numpy(np.stack(rows))


def distillation_loss(teachers: list, alpha: float, temperature: float, model, batch: torch.Tensor) -> torch.Tensor:
    which, tokens = batch[:, 0], batch[:, 1:]
    inputs = tokens[:, :-1]
    logits = model(input_ids=inputs).logits.float()
    loss = 0.0
    if alpha < 1:
        loss = (1 - alpha) * F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    if alpha > 0:
        with torch.no_grad():
            target = torch.empty_like(logits)
            for k, teacher in enumerate(teachers):
                rows = which == k
                if rows.any():
                    target[rows] = teacher(input_ids=inputs[rows]).logits.float()
        t = temperature
        kl = F.kl_div(F.log_softmax(logits / t, -1).reshape(-1, logits.size(-1)),
                      F.log_softmax(target / t, -1).reshape(-1, logits.size(-1)), log_target=True, reduction="batchmean")
        loss = loss + alpha * kl * t * t
    return loss


def distill(spec: DistillSpec, resume: bool = False) -> RunRecord:
    """Train the student; returns the run record (also `out/run.json`)."""
    run = Run(spec, resume, spec.train.progress)
    spec = run.spec
    if not spec.teachers:
        raise UserError("distill: 'teachers' lists no expert; give one {model, domain} per domain")
    served = [load_served(t.model) for t in spec.teachers]  # on the device the student trains on
    domains = _teacher_domains(spec, served)
    names = [f"teachers[{i}]" for i in range(len(served))]
    student_start = load_served(spec.student, device="cpu") if spec.student else None
    check_tokenizers(served + ([student_start] if student_start else []), names + ["student"] * bool(student_start))
    teachers = [s.for_domain(d) for s, d in zip(served, domains)]
    tokenizer = served[0].tokenizer_for(domains[0])
    train_shards, val_shards, domain_data = [], {}, {}
    for s, d, name in zip(served, domains, names):
        data = s.domain_data().get(d)
        if data is None:
            raise UserError(f"{name}: {s.path} has no record of its '{d}' training data")
        train_c, val_c = load_train_val(data.train, s.domain(d), data.val, spec.limit or data.limit,
                                        spec.val_limit or data.val_limit)
        train_shards.append(build_shard(train_c, tokenizer, spec.cache_dir))
        val_shards[d] = build_shard(val_c, tokenizer, spec.cache_dir)
        domain_data[d] = data
    preset = served[0].card.preset or "tiny"
    if student_start is not None:
        if not student_start.format.one_set_of_weights:
            raise UserError(f"student: {spec.student} is a {student_start.card.format} model; start from one set of weights")
        model = student_start.model
    else:
        model = build_model(get_preset(preset), tokenizer, seed=spec.train.seed)
    model.train()
    shares = spec.shares or [1.0] * len(domains)
    context = window(model.config.max_position_embeddings, spec.train.context)
    batches = LabelledBatches(train_shards, context, batch_windows(spec.train, context), spec.train.seed, shares)
    if not resume:
        run.folder.save(tokenizer.save_pretrained)
        save_specs(run.folder.path, [s.domain(d) for s, d in zip(served, domains)])
    card = ModelCard(domains=domains, method="distill", preset=preset, details={"distilled": {
        "teachers": {d: run.folder.portable(t.model) for d, t in zip(domains, spec.teachers)}, "alpha": spec.alpha}})
    run.begin(run.new_record("distill", spec.train.seed, domain_data, card=card.to_json(),
                             trainable_params=count_params(model, True), total_params=count_params(model)))
    log(f"distill: a {preset} student ({count_params(model):,} parameters) from {len(teachers)} teachers "
        f"({', '.join(domains)}), alpha {spec.alpha}")
    loss = lambda m, b: distillation_loss(teachers, spec.alpha, spec.temperature, m, b)  # noqa: E731
    for t in teachers:
        t.eval()
    trained, state = run.train(model, batches, loss_fn=loss)

    def measure() -> dict:
        bpb = {d: evaluate_bpb(trained, shard, context=batches.context)["bpb"] for d, shard in val_shards.items()}
        log("distill: bpb " + ", ".join(f"{d} {v:.4f}" for d, v in bpb.items()) + f" → {run.folder.path}")
        return {"bpb": bpb}

    return run.finish(trained, Checkpoint(), card, state, measure)


def _teacher_domains(spec: DistillSpec, served) -> list[str]:
    """The teachers' domains, one each (a name their folder knows), and their shares checked."""
    domains = [s.domain(t.domain).name for s, t in zip(served, spec.teachers)]
    if len(set(domains)) != len(domains):
        raise UserError(f"distill: 'teachers' names a domain twice: {domains}; one teacher per domain")
    if spec.shares is not None and (len(spec.shares) != len(domains) or min(spec.shares) < 0 or sum(spec.shares) <= 0):
        raise UserError(f"distill: 'shares' {spec.shares} must give one non-negative share per teacher ({len(domains)})")
    return domains


def load_distill_spec(path: str | Path, out: str | None = None) -> DistillSpec:
    from ..config import build, load_yaml

    data = load_yaml(path)
    if out is not None:
        data["out"] = out
    root = Path(path).parent
    for t in data.get("teachers") or []:
        if isinstance(t, dict) and isinstance(t.get("model"), str) and not Path(t["model"]).is_absolute():
            t["model"] = str((root / t["model"]).resolve())
    if isinstance(data.get("student"), str) and not Path(data["student"]).is_absolute():
        data["student"] = str((root / data["student"]).resolve())
    return build(DistillSpec, data, str(path))
