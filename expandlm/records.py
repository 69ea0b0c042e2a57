"""The records a run folder keeps, typed, so that every reader uses one shape (and an older file is
mapped to it once, here):

    ModelCard      `expandlm.json`: which domains a model folder serves, in which folder format, made by
                   which training method
    RunRecord      `run.json`: what one run was asked, what it used and what it measured
    DomainSource   where a domain's training data came from
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UserError

MODEL_CARD = "expandlm.json"
# folders written before formats and methods were apart named one "strategy" for both (745b37b and
# earlier): the format that strategy stored its folder in
LEGACY_FORMATS = {"lora": "adapter", "expand_paths": "paths", "expand_branch": "branch", "arrow": "arrow"}
CARD_FIELDS = ("domains", "plain", "format", "method", "options", "base", "preset", "vocab")


@dataclass
class ModelCard:
    domains: list[str] = field(default_factory=list)
    # domains requested with no tag token: a pretrained model's own behaviour, asked for as its own
    # tokenizer starts a text (`data/tokenizer.py`, `request_prefix`)
    plain: list[str] = field(default_factory=list)
    format: str = "checkpoint"     # how the folder is stored and served (`formats/`)
    method: str = "scratch"        # how it was made: a training method (`adapt/`), or scratch, merge, distill, export
    options: dict = field(default_factory=dict)  # the method's options
    base: str | None = None        # the folder it is built on (an adapter's, a branch's), relative to it
    preset: str | None = None
    vocab: dict | None = None      # {"base": old tokenizer size, "size": this one's} after adapt
    details: dict = field(default_factory=dict)  # what the format reads to serve each domain, and provenance
    where: str = field(default=MODEL_CARD, compare=False, repr=False)  # the file it was read from, for errors

    @classmethod
    def from_json(cls, data: dict, where: str) -> "ModelCard":
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object")
        data = dict(data)
        if "strategy" in data and "format" not in data:  # an older folder
            strategy = data.pop("strategy")
            data["format"], data["method"] = LEGACY_FORMATS.get(strategy, "checkpoint"), strategy
        known = {k: data.pop(k) for k in CARD_FIELDS if k in data}
        for key, kind in (("domains", list), ("plain", list), ("format", str), ("method", str), ("options", dict)):
            if key in known and not isinstance(known[key], kind):
                raise UserError(f"{where}: field '{key}' must be a {kind.__name__}, got {known[key]!r}")
        return cls(**known, details=data, where=where)

    def to_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("details", "where") and v is not None}
        if not self.plain:  # cards of expandlm's own models stay as they were
            del out["plain"]
        return {**out, **self.details}

    def detail(self, key: str):
        """A field the format needs, or one error naming the card and the field."""
        if key not in self.details:
            raise UserError(f"{self.where}: field '{key}' is missing (a {self.format} folder records it)")
        return self.details[key]


@dataclass
class DomainSource:
    """Where a domain's training data came from (adapting, routing and distilling reuse it). In a stored
    record the paths are relative to the run folder; `usable_from` makes them usable from here."""
    train: str | None
    val: str | None = None
    limit: int | None = None
    val_limit: int | None = None

    def stored_in(self, folder) -> "DomainSource":
        return dataclasses.replace(self, train=folder.portable(self.train), val=folder.portable(self.val))

    def usable_from(self, folder) -> "DomainSource":
        return dataclasses.replace(self, train=folder.resolve(self.train), val=folder.resolve(self.val))


RUN_FIELDS = ("kind", "spec", "seed", "versions", "status", "strategy", "total_params", "trainable_params", "steps",
              "tokens", "train_seconds", "prep_seconds", "resumed_from", "bpb")


@dataclass
class RunRecord:
    """`run.json`: what one run (train, adapt, distill, merge) was asked, what it used and what it measured."""
    kind: str                      # expert | adapt | distill | merge
    spec: dict                     # the full config, paths relative to the folder
    seed: int
    versions: dict
    status: str = "running"        # running | done
    domain_data: dict[str, DomainSource] = field(default_factory=dict)
    card: dict | None = None       # the model card it wrote (adapt, distill, merge)
    strategy: str | None = None    # adapt: the training method
    total_params: int | None = None
    trainable_params: int | None = None
    steps: int | None = None
    tokens: int | None = None
    train_seconds: float | None = None
    prep_seconds: float | None = None
    resumed_from: int | None = None
    bpb: dict[str, float] = field(default_factory=dict)  # every domain it serves, on its validation set
    details: dict = field(default_factory=dict)  # what one kind adds (an expert's data statistics, adapt's forgetting)

    @classmethod
    def from_json(cls, data: dict, where: str) -> "RunRecord":
        if not isinstance(data, dict) or not all(k in data for k in ("kind", "spec", "seed")):
            raise UserError(f"{where}: expected a run record with 'kind', 'spec' and 'seed'")
        data = dict(data)
        # records written before this one read them: an expert's parameter count and its single bpb
        if "params" in data and "total_params" not in data:
            data["total_params"] = data.pop("params")
        if "val_bpb" in data:
            value = data.pop("val_bpb")
            if "bpb" not in data and value is not None and data.get("domain_data"):
                data["bpb"] = {next(iter(data["domain_data"])): value}
        known = {k: data.pop(k) for k in RUN_FIELDS if k in data}
        try:
            sources = {d: DomainSource(**s) for d, s in (data.pop("domain_data", None) or {}).items()}
        except TypeError as e:
            raise UserError(f"{where}: field 'domain_data': {e}") from None
        known.setdefault("versions", {})
        return cls(**known, domain_data=sources, card=data.pop("card", None), details=data)

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in RUN_FIELDS if getattr(self, k) is not None}
        out["domain_data"] = {d: dataclasses.asdict(s) for d, s in self.domain_data.items()}
        if self.card is not None:
            out["card"] = self.card
        return {**out, **self.details}
