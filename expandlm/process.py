"""This process's place in a run: under torchrun every process runs the same code, and only the main
one writes files."""
from __future__ import annotations

import os
import signal
import threading


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


class StopRequests:
    """SIGINT and SIGTERM while training (Ctrl-C; what a cluster scheduler, `docker stop`, Kubernetes and
    torchrun send before they kill) are noted, so that the loop saves at the next step boundary and stops;
    a second one stops at once. A torchrun worker whose launcher is gone (killed with -9) stops the same
    way, so that no worker trains on as an orphan."""

    def __init__(self):
        self.signum = 0
        # torchrun's workers are its children; an orphan is re-parented, so its parent id changes
        self.launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._note) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _note(self, signum, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        if is_main_process():  # os.write: print may not be re-entered from a handler
            os.write(2, f"\n{signal.Signals(signum).name}: saving at the end of this step, then stopping "
                        "(send it again to stop at once)\n".encode())

    def requested(self, world: int, device) -> int:
        """The signal every process stops on, 0 for none: the processes agree, so they stop at one step."""
        mine = self.signum or (signal.SIGTERM if self.launcher is not None and os.getppid() != self.launcher else 0)
        if world > 1:
            import torch
            import torch.distributed as dist
            agreed = torch.tensor([int(mine)], device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            mine = int(agreed.item())
        return int(mine)
