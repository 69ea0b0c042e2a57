"""A run folder: what one `train`, `adapt`, `compare` stage or `demo` leaves behind, and its state.

    run.json          the run record: kind, full config, seed, versions, data, metrics, status
    expandlm.json     the model card: which domains the model serves and the strategy that serves them
    metrics.jsonl     the training curve (loss, lr, tokens/s, validation bpb)
    checkpoint/       the resumable training state (accelerate's, plus train_state.json)
    suite.json        the evaluation suite's results (compare)
    config.json, model.safetensors, tokenizer.json, ...   the standard Hugging Face checkpoint

Only the main process writes (under torchrun every process runs the same code). Paths in run records
are stored relative to the run folder, so a folder can be used from any working directory and moved.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from .atomic import clean_leftovers, files_into, read_json, write_json
from .errors import UserError
from .process import distributed_state, is_main_process
from .records import MODEL_CARD, ModelCard, RunRecord

RUN_RECORD = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint"
TRAIN_STATE = "train_state.json"
SUITE = "suite.json"

PACKAGES = ("expandlm", "torch", "transformers", "tokenizers", "datasets", "accelerate", "peft",
            "safetensors", "numpy", "pydantic")


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


class RunFolder:
    """The layout, state and records of one run folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- state ------------------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def state(self) -> str:
        """"done" (a finished run), "resume" (an unfinished run: from its checkpoint, or from the start
        when it was stopped before its first one) or "new"."""
        if (self.path / RUN_RECORD).exists():
            return "done" if read_json(self.path / RUN_RECORD, "run record").get("status") == "done" else "resume"
        return "resume" if (self.checkpoint / TRAIN_STATE).exists() else "new"

    def begin(self, resume: bool) -> None:
        """Check that the folder fits the request (a new run never overwrites one, a resume needs an
        unfinished run) and clear what a fresh run must not inherit, or what a killed one left half-written
        (main process only)."""
        state = self.state
        if resume and state != "resume":
            raise UserError(f"{self.path}: nothing to resume (no unfinished run here); drop --resume")
        if not resume and state != "new":
            raise UserError(f"{self.path}: already holds a run; pass --resume to continue it, or choose another --out")
        distributed_state().wait_for_everyone()  # every process has looked before the main process changes anything
        if is_main_process():
            self.clear() if not resume else clean_leftovers(self.path)
        distributed_state().wait_for_everyone()

    def auto(self) -> str:
        """For stages that are reused (compare, demo): the state, after removing what an interrupted
        run left that cannot be resumed (it was killed before it wrote its run record)."""
        state = self.state
        if state == "new" and self.path.exists() and is_main_process():
            shutil.rmtree(self.path)
        return state

    def clear(self) -> None:
        """Remove a previous run's resumable state and curve (a fresh run starts from nothing)."""
        clean_leftovers(self.path)
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        (self.path / METRICS).unlink(missing_ok=True)
        self.path.mkdir(parents=True, exist_ok=True)

    # -- records ----------------------------------------------------------------------------------
    def record(self) -> RunRecord:
        return RunRecord.from_json(read_json(self.path / RUN_RECORD, "run record"), str(self.path / RUN_RECORD))

    def write_record(self, record: RunRecord) -> None:
        if is_main_process():
            write_json(self.path / RUN_RECORD, record.to_json())

    def card(self) -> ModelCard:
        """The model card; a folder without one is a plain checkpoint that serves its whole model."""
        path = self.path / MODEL_CARD
        return ModelCard.from_json(read_json(path, "model card"), str(path)) if path.exists() else ModelCard()

    def write_card(self, card: ModelCard) -> None:
        if is_main_process():
            write_json(self.path / MODEL_CARD, card.to_json())

    def save(self, save_fn) -> None:
        """Run a `save_pretrained(folder)` so that each file lands atomically beside the others."""
        if is_main_process():
            self.path.mkdir(parents=True, exist_ok=True)
            with files_into(self.path) as tmp:
                save_fn(tmp)

    # -- paths ------------------------------------------------------------------------------------
    def portable(self, value: str | os.PathLike | None) -> str | None:
        """A path as stored in a record: relative to this folder when it is a local file or folder
        (a hub id or a name such as `gpt2` is kept as is)."""
        if value is None or not os.path.exists(value):
            return None if value is None else str(value)
        return os.path.relpath(Path(value).resolve(), self.path.resolve())

    def resolve(self, value: str | None) -> str | None:
        """The inverse of `portable`: a stored path made usable from the current directory."""
        if value is None or os.path.isabs(value):
            return value
        candidate = self.path / value
        return str(candidate.resolve()) if os.path.exists(candidate) else value

    def metrics(self) -> list[dict]:
        import json
        path = self.path / METRICS
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
