"""One run in its folder, from start to finish, as `train`, `adapt`, `distill` and `merge` all live it:

    run = Run(spec, resume)         check the folder (a new run never overwrites one; a resume continues
                                    an unfinished one with the spec it was started with)
    run.begin(record)               the run record, status "running" (a resumed run keeps its own)
    run.train(model, batches, ...)  the training loop (checkpoints, resume, curves: `loop.py`)
    run.finish(model, fmt, card, state, measure)
                                    the model saved in its folder format, its card, then the record
                                    finished with what `measure` found (main process only)
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Callable

import torch

from ..config import build, path_fields
from ..data.corpus import default_data_dir
from ..domains import Domain, folder_domains, get_domain
from ..process import distributed_state
from ..records import RUN_FIELDS, DomainSource, ModelCard, RunRecord
from ..run_folder import RUN_RECORD, RunFolder, versions
from .loop import resolved_precision, train


def stored_spec(spec, folder: RunFolder) -> dict:
    """A spec as a run record stores it: paths relative to the run folder."""
    data = dataclasses.asdict(spec)
    for name in path_fields(type(spec)):
        data[name] = folder.portable(data[name]) if name != "out" else "."
    return data


def saved_spec(folder: RunFolder, spec_cls, progress: bool = True):
    """The spec a run was started with, its paths usable from here: a resumed run continues with
    exactly that (only the progress bar follows the new command line)."""
    data = dict(folder.record().spec)
    for name in path_fields(spec_cls):
        data[name] = folder.resolve(data[name]) if name != "out" else str(folder.path)
    if "train" in data:
        data["train"] = {**data["train"], "progress": progress}
    return build(spec_cls, data, f"{folder / RUN_RECORD}: spec")


def with_domain_data(spec, folder: RunFolder) -> tuple[object, Domain]:
    """The spec with its domain by name (a spec file is read once; the run folder keeps it, so a resumed
    run knows the domain) and its corpus: `--data` when given, else the files the domain's spec names (a
    built-in domain's under the data folder); the validation file follows the same choice. And the domain."""
    domain = get_domain(spec.domain, folder_domains(folder.path))
    spec = dataclasses.replace(spec, domain=domain.name)
    if spec.data is not None:
        return spec, domain
    train_file, valid = domain.local_files(default_data_dir())
    return dataclasses.replace(spec, data=train_file, val_data=spec.val_data or valid), domain


def domain_source(spec) -> DomainSource:
    """Where the spec's domain's data comes from."""
    return DomainSource(spec.data, spec.val_data, spec.limit, spec.val_limit)


class Run:
    def __init__(self, spec, resume: bool = False, progress: bool = True, out=None):
        self.folder = RunFolder(out if out is not None else spec.out)
        self.folder.begin(resume)
        self.spec = saved_spec(self.folder, type(spec), progress) if resume else spec
        self.resume, self.started, self.dist = resume, time.time(), distributed_state()
        self.record: RunRecord | None = None

    @property
    def is_main(self) -> bool:
        return self.dist.is_main_process

    def new_record(self, kind: str, seed: int, domain_data: dict[str, DomainSource], spec: dict | None = None,
                   **fields) -> RunRecord:
        """The record of this run as it starts: the config (`spec`, default: the run's, paths made relative),
        seed, versions and each domain's data."""
        known = {k: v for k, v in fields.items() if k in RUN_FIELDS or k == "card"}
        details = {k: v for k, v in fields.items() if k not in known}
        return RunRecord(kind, spec if spec is not None else stored_spec(self.spec, self.folder), seed, versions(),
                         domain_data={d: s.stored_in(self.folder) for d, s in domain_data.items()},
                         details=details, **known)

    def begin(self, record: RunRecord) -> RunRecord:
        """Write the record of a running run (a resumed run keeps the one it started with)."""
        self.record = dataclasses.replace(self.folder.record(), status="running") if self.resume else record
        self.folder.write_record(self.record)
        return self.record

    def train(self, model, batches, **kwargs):
        self.prep_seconds = time.time() - self.started
        self.trained_with = {"context": batches.context, "micro_batch": batches.batch_size,
                             "precision": resolved_precision(self.spec.train), "world_size": self.dist.num_processes,
                             "device": self.dist.device.type}
        self.record.details.update(self.trained_with)  # in run.json from the start: a running run says how it runs
        self.folder.write_record(self.record)
        wall, cpu = time.time(), time.process_time()
        try:
            return train(model, batches, self.folder, self.spec.train, resume=self.resume, **kwargs)
        finally:
            if self.dist.device.type == "cpu":  # how much of its threads' time the machine gave this run
                self.trained_with["cpu_threads"] = torch.get_num_threads()
                self.trained_with["cpu_share"] = round(
                    (time.process_time() - cpu) / max((time.time() - wall) * torch.get_num_threads(), 1e-9), 2)

    def finish(self, model, fmt, card: ModelCard, state, measure: Callable[[], dict],
               start: torch.nn.Module | None = None) -> RunRecord:
        """The model in its format and its card, then the record finished with what `measure()` returns
        (`bpb` per domain, and any further fields of the record). `start`: the model training began from
        (a format may store only what differs from it)."""
        if self.is_main:
            if model is not None:
                card = fmt.save(model, self.folder, card, start)
            self.folder.write_card(card)
            found = measure()
            r = self.record
            r.status, r.bpb = "done", found.pop("bpb", r.bpb)
            if state is not None:
                r.steps, r.tokens, r.resumed_from = state.step, state.tokens, state.resumed_from
                r.train_seconds, r.prep_seconds = round(state.elapsed_s, 1), round(self.prep_seconds, 1)
                r.details.update(self.trained_with, tokens_per_s=round(state.tokens / max(state.elapsed_s, 1e-9), 1))
            r.details.update(found, peak_rss_mib=peak_rss_mib())
            if torch.cuda.is_available():  # training and measuring: what a GPU had to hold at most
                r.details["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            self.folder.write_record(r)
        self.dist.wait_for_everyone()
        return self.record


def peak_rss_mib() -> int:
    """This process's peak resident memory so far (loading, training and measuring), in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 2**10)  # bytes on macOS, KiB on Linux
