"""This process's place in a run: under torchrun every process runs the same code, and only the main
one writes files."""
from __future__ import annotations


def distributed_state():
    """The process group of this run. Without a GPU, accelerate only forms a multi-process (gloo) group
    when told it is on CPU, so say so: `torchrun --nproc_per_node 2 -m expandlm train ...` then works."""
    import torch
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    return distributed_state().is_main_process


def log(*args) -> None:
    """A line of progress, printed once (by the main process)."""
    if is_main_process():
        print(*args, flush=True)
