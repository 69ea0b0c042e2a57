"""The model card (`expandlm.json`): which domains a model folder serves, in which folder format, made by
which training method. One typed record that every reader uses."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import UserError

MODEL_CARD = "expandlm.json"
# folders written before formats and methods were apart named one "strategy" for both (745b37b and
# earlier): the format that strategy stored its folder in
LEGACY_FORMATS = {"lora": "adapter", "expand_paths": "paths", "expand_branch": "branch", "arrow": "arrow"}
FIELDS = ("domains", "format", "method", "options", "base", "preset", "vocab")


@dataclass
class ModelCard:
    domains: list[str] = field(default_factory=list)  # empty: a plain checkpoint that serves its whole model
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
        known = {k: data.pop(k) for k in FIELDS if k in data}
        for key, kind in (("domains", list), ("format", str), ("method", str), ("options", dict)):
            if key in known and not isinstance(known[key], kind):
                raise UserError(f"{where}: field '{key}' must be a {kind.__name__}, got {known[key]!r}")
        return cls(**known, details=data, where=where)

    def to_json(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("details", "where") and v is not None}
        return {**out, **self.details}

    def detail(self, key: str):
        """A field the format needs, or one error naming the card and the field."""
        if key not in self.details:
            raise UserError(f"{self.where}: field '{key}' is missing (a {self.format} folder records it)")
        return self.details[key]
