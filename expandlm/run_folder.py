"""A run folder: what one `train`, `adapt`, `compare` stage or `demo` leaves behind, and its state.

    run.json          the run record: kind, full config, seed, versions, data, metrics, status
    expandlm.json     the model card: which domains the model serves and the strategy that serves them
    metrics.jsonl     the training curve (loss, lr, tokens/s, validation bpb)
    checkpoint/       the resumable training state (accelerate's, plus train_state.json)
    suite.json        the evaluation suite's results (compare)
    .expandlm         the mark of a folder expandlm made a run in (written before anything else)
    config.json, model.safetensors, tokenizer.json, ...   the standard Hugging Face checkpoint

expandlm removes or replaces files only in a folder it marked as its own: a non-empty folder that
holds neither the mark nor an expandlm record is the user's, and is refused in one line.

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
TRACKER_DIR = "logs"  # --report-to's files: logs/expandlm/ (TensorBoard events), logs/wandb/ (a W&B run)
CHECKPOINT = "checkpoint"
TRAIN_STATE = "train_state.json"
SUITE = "suite.json"
MARK = ".expandlm"
STUDY_RESULTS = "results.json"  # a study's or demo's

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


def _written_by_expandlm(record: Path) -> bool:
    try:
        return "expandlm" in read_json(record, "record").get("versions", {})
    except (UserError, OSError, AttributeError):
        return False


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
        self.claim()
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
        """For stages that are reused (compare, demo): the state of the folder, claimed for a run. What an
        interrupted run left that cannot be resumed (killed before its run record) is cleared by `begin`."""
        self.claim()
        return self.state

    def is_ours(self) -> bool:
        """Whether expandlm made this folder: its mark, or, for folders from before the mark, its model
        card, a record expandlm wrote (a run's, or a study's results), or a stage folder of a study."""
        if (self.path / MARK).exists() or (self.path / MODEL_CARD).exists():
            return True
        if any(_written_by_expandlm(self.path / name) for name in (RUN_RECORD, STUDY_RESULTS)):
            return True
        return any((child / MARK).exists() or _written_by_expandlm(child / RUN_RECORD)
                   for child in self.path.iterdir() if child.is_dir()) if self.path.is_dir() else False

    def claim(self) -> None:
        """Make this path a folder expandlm may write a run into, and mark it: a new or empty folder, or
        one expandlm made. A file, or a folder of the user's own files, is refused in one line."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: is a file, not a folder; --out names the folder a run is written to")
        if self.path.is_dir() and not self.is_ours() and any(self.path.iterdir()):
            raise UserError(f"{self.path}: holds files expandlm did not write; expandlm never replaces them: "
                            "choose a new or empty folder for --out")
        if is_main_process() and not (self.path / MARK).exists():
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / MARK).touch()

    def restart(self) -> None:
        """Forget a run that cannot be resumed (its records, curve and checkpoint), so that a new one
        begins here; its model files are replaced when the new run saves."""
        self.claim()
        if is_main_process():
            for name in (RUN_RECORD, MODEL_CARD, METRICS):
                (self.path / name).unlink(missing_ok=True)
            self.clear()

    def clear(self) -> None:
        """Remove a previous run's resumable state and curve (a fresh run starts from nothing)."""
        clean_leftovers(self.path)
        shutil.rmtree(self.checkpoint, ignore_errors=True)
        shutil.rmtree(self.path / TRACKER_DIR, ignore_errors=True)  # a fresh curve, in the trackers too
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
        """Run a `save_pretrained(folder)` so that each file lands atomically beside the others (in a
        folder expandlm may write: see `claim`)."""
        self.claim()
        if is_main_process():
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
