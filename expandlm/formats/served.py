"""A model folder, loaded to serve its domains, whatever made it.

`expandlm.json` beside the weights names the folder's format (`formats/`); the format loads the folder
and gives, per domain, a view of the shared model (`Format.serve`) or one standard transformers model
(`Format.export`). A folder without one is a checkpoint that transformers saved, whose own behaviour
is one plain domain (`checkpoint.pretrained_card`); a GGUF file is that checkpoint once dequantized
(`gguf_input`); a hub id that is no folder here is downloaded first.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..atomic import read_json
from ..domains import Domain, folder_domains, get_domain, plain_domain
from ..errors import UserError, did_you_mean
from ..records import MODEL_CARD, DomainSource, ModelCard
from ..run_folder import CHECKPOINT, RUN_RECORD, RunFolder
from . import Format, format_of
from .format import BASE_GGUF_SHA256
from .checkpoint import BASE_DOMAIN, PRETRAINED, pretrained_card
from .gguf_input import dequantized_folder, gguf_file
from ..data.tokenizer import load_tokenizer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ServedModel:
    folder: RunFolder
    model: torch.nn.Module
    tokenizer: object
    card: ModelCard
    format: Format
    known_domains: dict[str, Domain] = field(default_factory=dict)  # the user's domains the folder declares
    gguf: Path | None = None  # the GGUF file the folder was dequantized from (`gguf_input`)
    _tokenizers: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.folder.path

    @property
    def source(self) -> Path:
        """What the user named: the folder, or the GGUF file it was dequantized from (a folder grown from the
        model refers to this, and to the file's content: `reference`)."""
        return self.gguf or self.path

    def reference(self) -> dict:
        """The card fields by which a folder built on this model finds it again (`Format.base_folder`)."""
        if self.gguf is None:
            return {}
        from .gguf_input import SOURCE
        return {BASE_GGUF_SHA256: read_json(self.path / SOURCE, "GGUF source")["sha256"]}

    @property
    def domains(self) -> list[str]:
        return list(self.card.domains)

    def domain(self, name: str) -> Domain:
        """A domain by name: one the folder declares, a built-in one, or one given by its spec file."""
        return get_domain(name, self.known_domains)

    def _check(self, name: str) -> None:
        self.domain(name)
        if self.domains and name not in self.domains:
            hint = (f"; a checkpoint's own domain is named with --base-domain (--base-domain {name} serves it as "
                    f"'{name}')" if self.card.method == PRETRAINED else "")
            raise UserError(f"{self.path} serves {', '.join(self.domains)}, not '{name}'"
                            f"{did_you_mean(name, self.domains)}{hint}")

    def requested(self, name: str | None) -> Domain:
        """The domain `name`, or with none the one domain the model serves."""
        if name is not None:
            self._check(name)
            return self.domain(name)
        if len(self.domains) != 1:
            raise UserError(f"{self.path} serves {', '.join(self.domains) or 'no declared domain'}; "
                            "name one with --domain")
        return self.domain(self.domains[0])

    def tokenizer_for(self, name: str):
        """The tokenizer of `name`'s text (see `tokenizer_folder`)."""
        path = tokenizer_folder(self.folder, self.card, name)
        if path.resolve() == self.path.resolve():
            return self.tokenizer
        if path not in self._tokenizers:
            self._tokenizers[path] = load_tokenizer(path)
        return self._tokenizers[path]

    def for_domain(self, name: str):
        """The model as it answers requests for `name` (a view: the shared model is not changed)."""
        self._check(name)
        return self.format.serve(self.model, self.card, name)

    def export_model(self, name: str) -> torch.nn.Module:
        """`name`'s model as one standard `transformers` model computing exactly what `for_domain` serves."""
        self._check(name)
        return self.format.export(self.model, self.card, name)

    def decode_model(self, name: str):
        """What a decode engine runs for `name`: one plain transformers model (the format's export), or,
        where no one set of weights computes the domain (arrow), the served view for transformers' generate."""
        return self.export_model(name) if self.format.exportable else self.for_domain(name)

    def export(self, name: str, out: str | os.PathLike) -> RunFolder:
        """`name`'s model as a standard checkpoint folder (`AutoModelForCausalLM` loads it)."""
        model = self.export_model(name)
        folder = RunFolder(out)
        folder.save(model.save_pretrained)
        folder.save(self.tokenizer_for(name).save_pretrained)
        folder.write_card(ModelCard(domains=[name], plain=[name] if name in self.card.plain else [],
                                    method="export", preset=self.card.preset,
                                    details={"exported_from": folder.portable(self.path)}))
        return folder

    def export_gguf(self, name: str, out: str | os.PathLike, dtype: str = "f32") -> Path:
        """`name`'s model and tokenizer as one GGUF file that llama.cpp runs, its matrices in `dtype`
        (see `formats.gguf`)."""
        from .gguf import write_gguf

        write_gguf(self.export_model(name), self.tokenizer_for(name), out,
                   name=f"{self.path.name}/{name}", plain=name in self.card.plain, dtype=dtype)
        return Path(out)

    def domain_data(self) -> dict[str, DomainSource]:
        """Where each served domain's training data came from (paths usable from here)."""
        if not (self.folder / RUN_RECORD).exists():
            return {}
        return {d: s.usable_from(self.folder) for d, s in self.folder.record().domain_data.items()}


def tokenizer_folder(folder: RunFolder, card: ModelCard, name: str) -> Path:
    """Where the tokenizer of `name`'s text is saved, without loading any weights: the folder's, unless
    its format gives the domain its own (a domain the model does not serve, evaluated for forgetting
    or transfer, is read with the folder's)."""
    if name not in card.domains:
        return folder.path
    return format_of(card).tokenizer_folder(folder, card, name, _base_tokenizer_folder)


def _base_tokenizer_folder(path: Path, name: str) -> Path:
    base = RunFolder(path)  # already resolved by `Format.base_folder` (a GGUF base: its dequantized folder)
    return tokenizer_folder(base, base.card(), name)


def context_length(path: str | os.PathLike) -> int:
    """The context of a model folder without loading its weights (a LoRA folder: its base's)."""
    folder = RunFolder(path)
    if not (folder / "config.json").exists() and folder.card().base:
        folder = RunFolder(format_of(folder.card()).base_folder(folder, folder.card()))
    return read_json(folder / "config.json", "model config")["max_position_embeddings"]


def damaged_weights(folder: RunFolder, card: ModelCard) -> str | None:
    """Which weights file of a model folder (or of a LoRA folder's base) safetensors cannot open, and why;
    the error safetensors raises while a model loads does not say which file it was."""
    folders = [folder.path] + ([folder.path / card.base] if card.base else [])
    for path in (p for f in folders for p in sorted(f.rglob("*.safetensors")) if CHECKPOINT not in p.parts):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f"{path}: not a complete safetensors file ({e}; truncated or damaged)"
    return None


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]  # config, weights, tokenizer: no code, no .bin pickles


def model_folder(model: str | os.PathLike) -> Path:
    """The folder of `model`: a path, a GGUF file (or a folder of one) dequantized once, or a Hugging Face hub
    id that is no folder here, downloaded (or found in the hub's cache) as transformers' `from_pretrained` would."""
    path = Path(model)
    if gguf_file(path) is not None:
        return dequantized_folder(path)
    if path.is_dir():
        return path
    if path.exists() or not re.fullmatch(r"[\w][\w.-]*(/[\w][\w.-]*)?", str(model)):
        raise UserError(f"{path}: no such model folder")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(model), allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown id, gated: each is one line naming both readings of the name
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{model}: no such model folder, and not downloadable as a hub model id ({why})") from None


def load_served(path: str | os.PathLike, device: str | torch.device | None = None,
                base_domain: str = BASE_DOMAIN, opened: dict | None = None) -> ServedModel:
    """A model folder (or hub id) ready to serve, on `device` (default: the GPU when there is one).
    `base_domain` names the one domain of a folder without a model card (a pretrained checkpoint).
    `opened`: the folders already loaded, by path, shared with the caller's other loads (several folders
    built on one base load it, and hold its weights, once)."""
    served = _opened(path, base_domain, {} if opened is None else opened)
    served.model.to(device or default_device()).eval()  # one opened before may have been trained over since
    return served


def _opened(path, base_domain: str, opened: dict) -> ServedModel:
    """The folder from `opened`, or loaded into it (where transformers puts it: the caller moves it)."""
    folder = RunFolder(model_folder(path))
    key = (folder.path.resolve(), None if (folder / MODEL_CARD).exists() else base_domain)  # the name: card-less only
    if key not in opened:
        opened[key] = _load(folder, base_domain, opened)
        opened[key].gguf = gguf_file(path)
    return opened[key]


def _load(folder: RunFolder, base_domain: str, opened: dict) -> ServedModel:
    card = folder.card() if (folder / MODEL_CARD).exists() else pretrained_card(base_domain)
    fmt = format_of(card)
    # a base is named by what its child serves first: its first domain (a checkpoint's own has no card)
    open_base = lambda base: _opened(base, card.domains[0], opened)  # noqa: E731
    try:
        model = fmt.load(folder, card, open_base=open_base)
    except (SafetensorError, OSError) as e:
        raise UserError(damaged_weights(folder, card) or f"{folder.path}: cannot load the model ({e})") from None
    known = folder_domains(folder.path)
    known.update({name: plain_domain(name, known) for name in card.plain})
    return ServedModel(folder, model, load_tokenizer(folder.path), card, fmt, known)


def check_tokenizers(models: list[ServedModel], names: list[str]) -> None:
    """Models whose weights are combined (merged, or distilled into one student) read token ids alike: one
    tokenizer, else one line naming the first that differs."""
    vocab = models[0].tokenizer.get_vocab()
    for served, name in zip(models[1:], names[1:]):
        other = served.tokenizer.get_vocab()
        if other != vocab:
            differ = len(set(vocab.items()) ^ set(other.items())) // 2 or abs(len(vocab) - len(other))
            raise UserError(f"{name} ({served.path}) has a different tokenizer from {names[0]} ({models[0].path}): "
                            f"{len(other)} against {len(vocab)} tokens, about {differ} differ; the same token id "
                            "would mean different text, so their weights cannot be merged")
