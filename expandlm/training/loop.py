"""Training: one loop on `accelerate` for CPU, one GPU, or many (`accelerate launch`).

AdamW, linear warmup + cosine decay to a floor, gradient clipping and accumulation, bf16 autocast on
GPU, optional `torch.compile`; a budget in steps, tokens or minutes; periodic validation bpb; a progress
bar; metrics as JSONL; atomic checkpoints that a killed run resumes from exactly.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (ProjectConfiguration, broadcast_object_list, is_tensorboard_available, is_wandb_available,
                               set_seed)
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from pydantic import Field

from ..atomic import atomic_path, full_disk, read_json, write_json, write_text
from ..config import arg, config
from ..errors import Stopped, UserError, no_space_left
from ..process import StopRequests, distributed_state, log
from ..evaluation.bpb import evaluate_bpb
from ..model.window import DEFAULT_CONTEXT, next_token_nll
from ..run_folder import METRICS, TRACKER_DIR, TRAIN_STATE, RunFolder
from ..data.shards import PackedBatches, TokenShard
from ..data.vocab import NO_DECAY_ATTR

Positive = Annotated[int, Field(gt=0)]
TRACKER_PROJECT = "expandlm"  # the W&B project, and the TensorBoard run's folder name (under TRACKER_DIR)
PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}  # accelerate's names, said plainly

BATCH_WINDOWS, BATCH_TOKENS = 32, 8192  # the default batch: 32 windows, at most 8,192 tokens (a long context: fewer)
# saved activations one forward/backward may hold; a larger micro-batch is split (memory, not results). SmolLM2-135M
# at 1,024 tokens a window holds ~1.3 GiB per window (30 blocks), so it trains a window at a time in < 4 GiB
ACTIVATION_BUDGET = 2 << 30


class _TiedWeightNotice(logging.Filter):
    """accelerate warns on every checkpoint that the tied lm_head is stored once; that is intended."""
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


for _name in ("accelerate.utils.other", "accelerate.checkpointing"):  # where accelerate logs it
    logging.getLogger(_name).addFilter(_TiedWeightNotice())


@config
class TrainConfig:
    batch_size: Positive | None = arg(None, f"sequences per micro-batch per process (default: {BATCH_WINDOWS}, at most "
                                      f"{BATCH_TOKENS:,} tokens); split into passes whose activations fit "
                                      f"{ACTIVATION_BUDGET >> 30} GiB, gradients summed")
    grad_accum: Positive = arg(1, "micro-batches per optimizer step")
    lr: Annotated[float, Field(gt=0)] = arg(2e-3, "peak learning rate (linear warmup, then cosine)")
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = arg(0.1, "the cosine decays to lr × this")
    warmup_steps: Annotated[int, Field(ge=0)] | None = arg(None, "default: 5% of the steps, at most 200")
    weight_decay: Annotated[float, Field(ge=0)] = arg(0.1, "AdamW's decoupled weight decay (not on norms)")
    betas: tuple[float, float] = arg((0.9, 0.95), "AdamW's betas (comma-separated on the command line)")
    grad_clip: Annotated[float, Field(ge=0)] = arg(1.0, "clip the gradient norm to this (0: no clipping)")
    max_steps: Positive | None = arg(None, "budget in optimizer steps")
    max_tokens: Positive | None = arg(None, "budget in training tokens")
    minutes: Annotated[float, Field(gt=0)] | None = arg(None, "budget in minutes of wall time (re-planned as it goes)")
    eval_interval: Annotated[int, Field(ge=0)] = arg(100, "steps between validation passes (0: only at the end)")
    eval_docs: Positive = arg(200, "validation documents per periodic pass")
    log_interval: Positive = arg(10, "steps between metrics records")
    checkpoint_interval: Positive = arg(200, "steps between checkpoints (also every 5 minutes and at the end)")
    context: Positive | None = arg(None, "tokens per training window (default: the model's context, at most "
                                   f"{DEFAULT_CONTEXT}; `train` builds its model with this context)")
    seed: int = arg(0, "seed of the weights, the data order and sampling")
    precision: Literal["auto", "no", "bf16", "fp16"] = arg(
        "auto", "auto: bf16 autocast on a GPU, and on a CPU whose bf16 matmuls are faster (measured); else fp32")
    compile: bool = arg(False, "torch.compile the model")
    report_to: Literal["none", "tensorboard", "wandb"] = arg(
        "none", f"also log the curve through accelerate's trackers (Trainer's flag): TensorBoard event files, or a "
        f"W&B run (WANDB_MODE=offline without a network), under the run folder's {TRACKER_DIR}/")
    progress: bool = arg(True, "show a progress bar")


def causal_lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of a batch of `context + 1` token windows (a large vocabulary's logits
    a chunk at a time: `next_token_nll`)."""
    return next_token_nll(model, batch[:, :-1], batch[:, 1:], reduction="mean")


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on norms (1-D tensors) nor on tensors
    marked with NO_DECAY_ATTR (partly frozen ones: decoupled decay would move their frozen rows)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, NO_DECAY_ATTR, False)]
    no_decay = [p for p in params if p.dim() < 2 or getattr(p, NO_DECAY_ATTR, False)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW (one kernel for all tensors) on a GPU, as nanoGPT does; the CPU keeps the loop whose
    # results the studies were run with
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=torch.cuda.is_available())


def _accelerator(precision: str, report_to: str = "none", folder: Path | None = None) -> Accelerator:
    # accelerate keeps one process-wide state and refuses a second Accelerator of another precision; a
    # process that trains twice (a study, a notebook, the tests) drops it, keeping the distributed part
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, precision):
        AcceleratorState._reset_state(reset_partial_state=False)
    tracking = {}
    if report_to != "none":
        if not {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[report_to]():
            raise UserError(f"--report-to {report_to} needs the {report_to} package: pip install {report_to}")
        tracking = {"log_with": report_to, "project_config": ProjectConfiguration(
            project_dir=str(folder), logging_dir=str(folder / TRACKER_DIR))}
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), **tracking)


def batch_windows(cfg: TrainConfig, context: int) -> int:
    """Windows per micro-batch: --batch-size, or the default (BATCH_WINDOWS, at most BATCH_TOKENS tokens)."""
    return cfg.batch_size or max(1, min(BATCH_WINDOWS, BATCH_TOKENS // context))


def activation_bytes(model, context: int) -> int:
    """About what a forward pass keeps for the backward per window: a pre-norm block's hidden-size tensors
    (norms, q/k/v, attention and projections, residuals: ~8) and MLP-size ones (gate, up, act, product: 4)
    in fp32 (autocast keeps some of them so). Only an estimate to split batches by; nothing relies on it."""
    c = getattr(model, "config", None)
    hidden, layers = getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None)
    if not (hidden and layers):
        return 0  # not a transformers model: never split
    inner = getattr(c, "intermediate_size", None) or 4 * hidden
    return 4 * context * layers * (8 * hidden + 4 * inner)


def passes(rows: int, window_bytes: int) -> int:
    """How many forward/backward passes a micro-batch of `rows` windows takes within ACTIVATION_BUDGET."""
    per_pass = max(1, ACTIVATION_BUDGET // window_bytes) if window_bytes else rows
    return math.ceil(rows / min(rows, per_pass))


BF16_CPU_SPEEDUP = 1.5  # auto takes bf16 on a CPU whose bf16 matmul is at least this much faster than fp32's


def resolved_precision(cfg: TrainConfig) -> str:
    """--precision as the run uses it: auto is bf16 autocast on a GPU that has bf16, and on a CPU whose bf16
    matmuls are clearly faster (AMX / avx512_bf16), measured once; else fp32."""
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_bf16_speedup() >= BF16_CPU_SPEEDUP else "no"


@functools.cache
def cpu_bf16_speedup(n: int = 512, repeats: int = 3) -> float:
    """fp32 time / bf16 time of an n×n×n matmul on this CPU, the best of `repeats` (a CPU without bf16 units
    emulates it: 40× slower than fp32 on the AVX2 EPYC these studies ran on, so autocast there would cost
    far more than it saves)."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # the first call allocates and picks a kernel
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        best[dtype] = min(times)
    speedup = best[torch.float32] / best[torch.bfloat16]
    log(f"precision auto: a bf16 matmul runs {speedup:.2f}x as fast as fp32 on this CPU, so training computes in "
        + ("bf16 autocast" if speedup >= BF16_CPU_SPEEDUP else "fp32"))
    return speedup


@dataclass
class TrainState:
    """What, besides model/optimizer/scheduler/RNG (saved by accelerate), a resume needs."""
    step: int = 0
    tokens: int = 0
    total_steps: int = 0
    elapsed_s: float = 0.0
    val_bpb: float | None = None
    resumed_from: list[int] = field(default_factory=list)  # the steps this run was resumed at
    # the metrics record in progress: its steps so far and each process's sum of their losses, so that
    # a run resumed between two records logs the loss an uninterrupted one does
    window_steps: int = 0
    window_loss: list[float] = field(default_factory=list)


CHECKPOINT_FILES = "files"  # train_state.json's key for the size of each file of the checkpoint


def load_train_state(ckpt: Path) -> TrainState:
    """The state a checkpoint resumes from, once every file it was saved with is there whole (accelerate
    would fail on a truncated file with a traceback, or, for the RNG state, skip it silently)."""
    path = ckpt / TRAIN_STATE
    data = read_json(path, "training state")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of training state, got {type(data).__name__}")
    for name, size in data.pop(CHECKPOINT_FILES, {}).items():
        file = ckpt / name
        found = file.stat().st_size if file.is_file() else None
        if found != size:
            raise UserError(f"{file}: {'missing' if found is None else f'{found:,} bytes'}, saved with {size:,} "
                            f"(truncated or damaged); remove {ckpt} to restart the run from its start with --resume")
    try:
        return TrainState(**data)
    except TypeError as e:
        raise UserError(f"{path}: not a training state ({e})") from None


def _load_checkpoint(accelerator, ckpt: Path) -> None:
    try:
        accelerator.load_state(str(ckpt))
    except Exception as e:  # a damaged file of the same size, or a checkpoint saved without file sizes
        first = (str(e).splitlines() or [""])[0]
        raise UserError(f"{ckpt}: cannot resume from this checkpoint ({type(e).__name__}: {first}); remove it to "
                        "restart the run from its start with --resume") from None


def forward_backward(model, batch: torch.Tensor, accelerator, loss_fn, n_passes: int, accum: int = 1,
                     sync: bool = True) -> torch.Tensor:
    """The mean loss of `batch` and its gradient (/ `accum`) added to the parameters', in `n_passes` passes of
    equal-length windows: the same gradient as one pass, within rounding, in a fraction of the memory. Only
    the last pass syncs data-parallel gradients when `sync`."""
    total = torch.zeros((), device=accelerator.device)
    pieces = batch.tensor_split(n_passes)
    for k, piece in enumerate(pieces):
        last = sync and k == len(pieces) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():  # a fresh context each pass: one can be entered once
                loss = loss_fn(model, piece)
            share = len(piece) / len(batch)
            accelerator.backward(loss * share / accum)  # one pass: loss / accum, as before
        total += loss.detach() * share
    return total


def _timed_micro_steps(model, batches, accelerator, loss_fn, n_passes: int = 1, n: int = 4, warmup: int = 2,
                       clock=time.perf_counter) -> float:
    """Seconds per micro-step, measured on forward+backward passes whose gradients are then dropped
    (the weights and optimizer are untouched, so calibration does not change the run)."""
    times = []
    for i in range(warmup + n):
        t0 = clock()
        forward_backward(model, batches.batch(i).to(accelerator.device), accelerator, loss_fn, n_passes)
        times.append(clock() - t0)
    model.zero_grad(set_to_none=True)
    return sum(times[warmup:]) / n  # the first passes include one-off allocation costs


def _step_cap(cfg: TrainConfig, tokens_per_step: int) -> int | None:
    """The fixed budgets (max_steps, max_tokens) in steps: the smaller one, None when neither is given."""
    caps = [c for c in (cfg.max_steps, cfg.max_tokens and math.ceil(cfg.max_tokens / tokens_per_step)) if c]
    return min(caps) if caps else None


def step_tokens(cfg: TrainConfig, batches, world: int) -> int:
    """Training tokens of one optimizer step over all processes."""
    return batches.batch_size * batches.context * cfg.grad_accum * world


def planned_tokens(cfg: TrainConfig, tokens_per_step: int, epoch_tokens: int) -> int | None:
    """The training tokens a run will see, known before it starts: the fixed budgets, or one epoch when
    there is no budget at all; None under a minutes budget (where it stops depends on the machine's pace)."""
    if cfg.minutes:
        return None
    return plan_steps(cfg, tokens_per_step, epoch_tokens) * tokens_per_step


def plan_steps(cfg: TrainConfig, tokens_per_step: int, epoch_tokens: int, micro_step_s: float | None = None,
               micro_tokens: int = 1, eval_tokens: float = 0.0) -> int:
    """Total optimizer steps from the budgets, planned before the first step. Fixed budgets (steps, tokens,
    one epoch) stay this plan. A minutes budget starts from the measured micro-step time (plus the
    validation passes, whose forward-only tokens cost about a third of a training token) and is only a
    first estimate: `train` re-plans it from the measured pace as the run goes (`replan_steps`)."""
    cap = _step_cap(cfg, tokens_per_step)
    candidates = [cap] if cap else []
    if cfg.minutes:
        per_step = micro_step_s * cfg.grad_accum
        if cfg.eval_interval:
            per_step += eval_tokens / 3 * (micro_step_s / micro_tokens) / cfg.eval_interval
        candidates.append(int(cfg.minutes * 60 * 0.97 / per_step))
    if not candidates:
        candidates.append(math.ceil(epoch_tokens / tokens_per_step))
    return max(1, min(candidates))


def replan_steps(cfg: TrainConfig, step: int, elapsed_s: float, step_s: float, cap: int | None = None,
                 reserve_s: float = 0.0) -> int:
    """A minutes budget re-planned mid-run: the `step`s done plus as many more as the time left (less
    `reserve_s`, kept for the final validation) holds at `step_s` seconds per step, rounded to the nearest
    step so that the run ends as close to the budget as its steps allow (stopping whenever a step might not
    fit ends short by half a step on average, and steps on a busy machine are long). Returns `step`
    itself, i.e. stop now, once under half a step is left; `cap` (max_steps / max_tokens) wins when smaller."""
    total = step + max(0, round((cfg.minutes * 60 - elapsed_s - reserve_s) / max(step_s, 1e-9)))
    return min(total, cap) if cap else total


class CosinePlan:
    """LR factor for LambdaLR: linear warmup over `warmup` steps, then a cosine down to `min_ratio` at step
    `total` (the curve of transformers' cosine-with-min-lr schedule). `total` may move while the run goes
    (a re-planned minutes budget) and the decay follows it. An object rather than a closure so that
    LambdaLR's state_dict keeps its fields: a resumed run goes on with the warmup its run started with."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(model, batches: PackedBatches, folder: RunFolder | str | os.PathLike, cfg: TrainConfig,
          val_shard: TokenShard | None = None, loss_fn=causal_lm_loss, resume: bool = False,
          clock=time.monotonic) -> tuple[torch.nn.Module, TrainState]:
    """Train `model` (whose frozen parameters stay untouched) on `batches`; returns the unwrapped model.

    The run folder's `checkpoint/` holds the resumable state, its `metrics.jsonl` the loss and bpb curve.
    `clock` times the minutes budget (tests pass a simulated one).
    """
    loop = _Loop(model, batches, folder if isinstance(folder, RunFolder) else RunFolder(folder), cfg, val_shard,
                 loss_fn, clock)
    loop.start(resume)
    return loop.run()


class _Loop:
    """One training run's moving parts (model, optimizer, schedule, state, logging window), so that each
    phase of a step is a method of its own."""

    def __init__(self, model, batches, folder: RunFolder, cfg: TrainConfig, val_shard, loss_fn, clock):
        self.batches, self.folder, self.cfg, self.val_shard, self.loss_fn, self.clock = (
            batches, folder, cfg, val_shard, loss_fn, clock)
        self.metrics = folder / METRICS
        if distributed_state().is_main_process:
            folder.path.mkdir(parents=True, exist_ok=True)
        precision = resolved_precision(cfg)
        self.accelerator = accelerator = _accelerator(precision, cfg.report_to, folder.path)
        if cfg.report_to != "none":
            # hyperparameters as trackers take them (scalars and strings); the full spec is in run.json
            hparams = {f.name: v if isinstance(v := getattr(cfg, f.name), (int, float, str, bool)) else str(v)
                       for f in fields(cfg)}
            accelerator.init_trackers(TRACKER_PROJECT, config=hparams,
                                      init_kwargs={"wandb": {"dir": str(folder.path / TRACKER_DIR),
                                                             "name": folder.path.name}})
        if accelerator.device.type == "cuda":  # TF32 for the fp32 matmuls autocast leaves (and fp32 runs)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        set_seed(cfg.seed)
        if cfg.compile:
            model = torch.compile(model)
        optimizer = make_optimizer(model, cfg)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        log(f"training: {self.world} process{'es' if self.world > 1 else ''} on {accelerator.device.type}, "
            f"{PRECISION_NAMES.get(precision, precision)}")
        if self.world == 1 and "ACCELERATE_USE_CPU" in os.environ and accelerator.device.type == "cpu":
            # `accelerate launch --num_processes N --cpu` runs one process unless told --multi_cpu
            log("accelerate launch started one process: for several on CPUs, use torchrun --nproc_per_node N "
                "(or accelerate launch --multi_cpu)")
        self.tokens_per_step = step_tokens(cfg, batches, self.world)
        self.passes = passes(batches.batch_size, activation_bytes(accelerator.unwrap_model(self.model), batches.context))
        if self.passes > 1:
            log(f"{batches.batch_size} windows of {batches.context} tokens a micro-batch, in {self.passes} passes "
                f"(activations within {ACTIVATION_BUDGET >> 30} GiB)")
        self.state = TrainState()
        self.eval_tokens = min(cfg.eval_docs, val_shard.meta["documents"]) * (
            val_shard.meta["tokens"] / val_shard.meta["documents"]) if val_shard else 0.0
        self.lr_plan = None

    def start(self, resume: bool) -> None:
        """The state to start from (a checkpoint's, or a new plan) and the learning-rate schedule."""
        cfg, state, ckpt = self.cfg, self.state, self.folder.checkpoint
        if resume and (ckpt / TRAIN_STATE).exists():
            self.state = state = load_train_state(ckpt)
            state.resumed_from.append(state.step)
        else:  # a fresh run, or one stopped before its first checkpoint: resumed from the start
            state.resumed_from = [0] if resume else []
            resume = False
            micro_s = (_timed_micro_steps(self.model, self.batches, self.accelerator, self.loss_fn, self.passes,
                                          clock=self.clock) if cfg.minutes else None)
            state.total_steps = plan_steps(cfg, self.tokens_per_step, self.batches.tokens_per_epoch, micro_s,
                                           self.batches.batch_size * self.batches.context, self.eval_tokens)
            if self.world > 1:  # step times differ between processes: all follow the main process's plan
                state.total_steps = broadcast_object_list([state.total_steps])[0]
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(200, max(1, state.total_steps // 20))
        if cfg.minutes:  # the plan moves (see `_replan`), and the decay must end where the run ends
            self.lr_plan = CosinePlan(warmup, state.total_steps, cfg.min_lr_ratio)
            self.scheduler = LambdaLR(self.optimizer, self.lr_plan)
        else:  # fixed budgets: the schedule studies were run with, unchanged
            self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(self.optimizer, warmup, state.total_steps,
                                                                         min_lr_rate=cfg.min_lr_ratio)
        self.accelerator.register_for_checkpointing(self.scheduler)
        if resume:
            _load_checkpoint(self.accelerator, ckpt)
        if self.accelerator.is_main_process:
            _truncate_metrics(self.metrics, state.step)

    def run(self) -> tuple[torch.nn.Module, TrainState]:
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        self.bar = tqdm(total=state.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
                        disable=not (cfg.progress and accelerator.is_main_process))
        self.model.train()
        self.started, last_save = self.clock() - state.elapsed_s, time.time()
        # A minutes budget is re-planned from the pace: wall time per step, validation and checkpoints
        # included, over the recent steps: the last 5% of the budget and at least 10 steps. Not the whole
        # run, so that a machine turning busy or idle shows within seconds; long enough to smooth out noise.
        self.horizon_s = (cfg.minutes or 0) * 60 / 20
        self.step_ends, self.pace = deque(), None  # clock() after each step of this process; seconds per step
        self.cap, self.first_step = _step_cap(cfg, self.tokens_per_step), state.step
        # a validation pass costs about this many steps (forward-only tokens at a third of a training token),
        # measured once one has run; the final one's time is kept aside so the run ends with it at the budget
        self.val_steps = self.eval_tokens / 3 / (self.batches.batch_size * self.batches.context * cfg.grad_accum)
        self.postfix = {"loss": "-", "tok_s": "-", "val_bpb": "-"}
        self._new_window()
        if state.window_steps:  # resumed between two records: the one in progress goes on (tokens/s restarts)
            own = (state.window_loss[self.rank] if len(state.window_loss) == self.world
                   else sum(state.window_loss) / len(state.window_loss))
            self.window_loss, self.window_steps = torch.tensor(own, device=accelerator.device), state.window_steps
        try:
            with StopRequests() as stops:
                self._steps(stops, last_save)
        finally:  # flushed however the run ends; not accelerator.end_training(), which ends the process group
            for tracker in accelerator.trackers:
                tracker.finish()
        self.bar.close()
        # Without accelerate's autocast wrapper: what the run measures next (its final bpb) and saves is the
        # model as every later command loads it (fp32 on a CPU), not bf16 autocast's numbers.
        return accelerator.unwrap_model(self.model, keep_fp32_wrapper=False), state

    def _steps(self, stops: StopRequests, last_save: float) -> None:
        cfg, state = self.cfg, self.state
        while state.step < state.total_steps:
            step_loss = self._optimizer_step()
            if cfg.minutes:
                self._replan()
            self.scheduler.step()  # after the re-plan: the LR of the next step follows the new plan
            self.optimizer.zero_grad(set_to_none=True)
            last = state.step >= state.total_steps  # the plan's end, or a minutes budget's time is up
            self.window_loss += step_loss
            self.window_steps += 1
            self.window_tokens += self.tokens_per_step
            self.bar.update(1)
            if state.step % cfg.log_interval == 0 or last:
                self._log()
            if (cfg.eval_interval and state.step % cfg.eval_interval == 0) or last:
                self._validate()
            state.elapsed_s = self.clock() - self.started
            overdue = False  # a checkpoint every 5 minutes too; the main process decides for all (ranks must agree)
            if state.step % cfg.log_interval == 0:
                overdue = time.time() - last_save > 300
                if self.world > 1:
                    overdue = broadcast_object_list([overdue])[0]
            saved = state.step % cfg.checkpoint_interval == 0 or overdue or last
            if saved:
                self._save_checkpoint()
                last_save = time.time()
            signum = stops.requested(self.world, self.accelerator.device)
            if signum and not last:
                if not saved:
                    self._save_checkpoint()
                self.bar.close()
                raise Stopped(f"stopped by {signal.Signals(signum).name} at step {state.step} of {state.total_steps}, "
                              f"saved in {self.folder.checkpoint}; the same command with --resume (and --out "
                              f"{self.folder.path}) continues it", signum)

    def _optimizer_step(self) -> torch.Tensor:
        """One optimizer step over `grad_accum` micro-batches; returns its mean loss."""
        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            batch = self.batches.batch(self.state.step * cfg.grad_accum + micro, self.rank, self.world)
            loss = forward_backward(model, batch.to(accelerator.device), accelerator, self.loss_fn, self.passes,
                                    cfg.grad_accum, sync=micro == cfg.grad_accum - 1)
            step_loss += loss / cfg.grad_accum
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        return step_loss

    def _replan(self) -> None:
        """A minutes budget's plan from the recent pace. One process re-plans after every step (it costs
        nothing); several must all take the same steps, so they follow the main process's plan, broadcast
        at fixed steps: early ones (the calibration may be off) and every log_interval."""
        state, now = self.state, self.clock()
        self.step_ends.append(now)
        while len(self.step_ends) > 11 and now - self.step_ends[1] >= self.horizon_s:
            self.step_ends.popleft()
        here = state.step - self.first_step
        if here >= 2 and (self.world == 1 or here in (2, 4, 8) or state.step % self.cfg.log_interval == 0):
            self.pace = (now - self.step_ends[0]) / (len(self.step_ends) - 1)
            total = replan_steps(self.cfg, state.step, now - self.started, self.pace, self.cap,
                                 self.val_steps * self.pace)
            if self.world > 1:
                total = broadcast_object_list([total])[0]
            state.total_steps = self.lr_plan.total = self.bar.total = total

    def _new_window(self) -> None:
        """The logging window: the steps since the last record."""
        self.window_loss = torch.zeros((), device=self.accelerator.device)
        self.window_steps, self.window_tokens, self.window_t0 = 0, 0, time.time()

    def _log(self) -> None:
        state = self.state
        loss_mean = self.accelerator.reduce(self.window_loss, "mean").item() / self.window_steps
        dt = time.time() - self.window_t0
        record = {"step": state.step, "tokens": state.tokens, "loss": round(loss_mean, 5),
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": round(self.window_tokens / max(dt, 1e-9), 1),
                  "elapsed_s": round(self.clock() - self.started, 2)}
        self.postfix.update(loss=f"{loss_mean:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        self.bar.set_postfix(self.postfix)
        _append_metrics(self.metrics, record, self.accelerator)
        self._track({"train/loss": record["loss"], "train/learning_rate": record["lr"],
                     "train/tokens_per_s": record["tokens_per_s"], "train/tokens": state.tokens})
        self.window_loss.zero_()
        self.window_steps, self.window_tokens, self.window_t0 = 0, 0, time.time()

    def _validate(self) -> None:
        """bpb on the validation shard (main process), logged; its time measures a pass in steps."""
        if self.val_shard is None:
            return
        accelerator, state, val_t0 = self.accelerator, self.state, self.clock()
        bpb = None
        if accelerator.is_main_process:
            bpb = evaluate_bpb(accelerator.unwrap_model(self.model), self.val_shard, max_docs=self.cfg.eval_docs,
                               context=self.batches.context)["bpb"]
        accelerator.wait_for_everyone()
        if self.pace:
            self.val_steps = (self.clock() - val_t0) / self.pace
        if bpb is not None:
            state.val_bpb = bpb
            _append_metrics(self.metrics, {"step": state.step, "tokens": state.tokens, "val_bpb": bpb}, accelerator)
            self._track({"eval/bpb": bpb})
            self.postfix["val_bpb"] = f"{bpb:.3f}"
            self.bar.set_postfix(self.postfix)

    def _track(self, values: dict) -> None:
        """To --report-to's tracker, by optimizer step (the main process's; a no-op without one)."""
        if self.accelerator.trackers:
            self.accelerator.log(values, step=self.state.step)

    def _save_checkpoint(self) -> None:
        accelerator, state = self.accelerator, self.state
        accelerator.wait_for_everyone()
        state.window_steps = self.window_steps
        state.window_loss = accelerator.gather(self.window_loss.reshape(1)).tolist()
        # the main process owns the atomic folder; every process writes its own RNG state into it
        with atomic_path(self.folder.checkpoint, folder=True) if accelerator.is_main_process else nullcontext("") as tmp:
            tmp_name = broadcast_object_list([str(tmp)])[0] if self.world > 1 else str(tmp)
            accelerator.save_state(tmp_name)
            accelerator.wait_for_everyone()  # every process's RNG file is in the folder before it moves
            if accelerator.is_main_process:
                files = {str(p.relative_to(tmp_name)): p.stat().st_size for p in Path(tmp_name).rglob("*") if p.is_file()}
                write_json(Path(tmp_name) / TRAIN_STATE, {**asdict(state), CHECKPOINT_FILES: files})
        accelerator.wait_for_everyone()


def _append_metrics(path: Path, record: dict, accelerator) -> None:
    if accelerator.is_main_process:
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if no_space_left(e):  # a half-written line is dropped on resume (`_truncate_metrics`)
                raise full_disk(path) from None
            raise


def _truncate_metrics(path: Path, step: int) -> None:
    """A resumed run restarts from its checkpoint: drop records logged after it, so the curve has no
    duplicates."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if (logged := _logged_step(line)) is not None
                and logged <= step]
        write_text(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> int | None:
    """The step of a metrics line; None for a blank line or one cut short (a full disk, a kill mid-write)."""
    try:
        return json.loads(line)["step"] if line.strip() else None
    except json.JSONDecodeError:
        return None
