"""Training: one loop on `accelerate` for CPU, one GPU, or many (`accelerate launch`).

AdamW, linear warmup + cosine decay to a floor, gradient clipping and accumulation, bf16 autocast on
GPU, optional `torch.compile`; a budget in steps, tokens or minutes; periodic validation bpb; a progress
bar; metrics as JSONL; atomic checkpoints that a killed run resumes from exactly.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from .artifacts import replace_dir, write_json_atomic
from .errors import UserError
from .evaluate import evaluate_bpb
from .shards import PackedBatches, TokenShard

CHECKPOINT = "checkpoint"


class _TiedWeightNotice(logging.Filter):
    """accelerate warns on every checkpoint that the tied lm_head is stored once; that is intended."""
    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


for _name in ("accelerate.utils.other", "accelerate.checkpointing"):  # where accelerate logs it
    logging.getLogger(_name).addFilter(_TiedWeightNotice())

METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    batch_size: int = 32           # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # default: 5% of the steps, at most 200
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    max_steps: int | None = None   # budgets: the smallest one given wins; none given = one epoch
    max_tokens: int | None = None
    minutes: float | None = None
    eval_interval: int = 100       # steps between validation passes (0: only at the end)
    eval_docs: int = 200           # validation documents per periodic pass
    log_interval: int = 10
    checkpoint_interval: int = 200  # steps; a checkpoint is also written every 5 minutes and at the end
    seed: int = 0
    precision: str = "auto"        # auto (bf16 on GPU, fp32 on CPU) | no | bf16 | fp16
    compile: bool = False
    progress: bool = True


def causal_lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of a batch of `context + 1` token windows."""
    logits = model(input_ids=batch[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


NO_DECAY_ATTR = "_expandlm_no_decay"


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on norms (1-D tensors) nor on tensors
    marked with NO_DECAY_ATTR (partly frozen ones: decoupled decay would move their frozen rows)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen")
    decay = [p for p in params if p.dim() >= 2 and not getattr(p, NO_DECAY_ATTR, False)]
    no_decay = [p for p in params if p.dim() < 2 or getattr(p, NO_DECAY_ATTR, False)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=False)


def distributed_state() -> PartialState:
    """The process group of this run. Without a GPU, accelerate only forms a multi-process (gloo) group
    when told it is on CPU, so say so: `torchrun --nproc_per_node 2 -m expandlm train ...` then works."""
    return PartialState(cpu=not torch.cuda.is_available())


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return cfg.precision


@dataclass
class TrainState:
    """What, besides model/optimizer/scheduler/RNG (saved by accelerate), a resume needs."""
    step: int = 0
    tokens: int = 0
    total_steps: int = 0
    elapsed_s: float = 0.0
    val_bpb: float | None = None
    resumed_from: list[int] = field(default_factory=list)  # the steps this run was resumed at


def _timed_micro_steps(model, batches, accelerator, loss_fn, n: int = 4, warmup: int = 2) -> float:
    """Seconds per micro-step, measured on forward+backward passes whose gradients are then dropped
    (the weights and optimizer are untouched, so calibration does not change the run)."""
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        batch = batches.batch(i).to(accelerator.device)
        accelerator.backward(loss_fn(model, batch))
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return sum(times[warmup:]) / n  # the first passes include one-off allocation costs


def plan_steps(cfg: TrainConfig, tokens_per_step: int, epoch_tokens: int, micro_step_s: float | None = None,
               micro_tokens: int = 1, eval_tokens: float = 0.0) -> int:
    """Total optimizer steps from the budgets. A minutes budget is turned into steps once, from the
    measured micro-step time (plus the validation passes, whose forward-only tokens cost about a third
    of a training token), so the LR schedule is fixed and a resumed run follows the same one."""
    candidates = []
    if cfg.max_steps:
        candidates.append(cfg.max_steps)
    if cfg.max_tokens:
        candidates.append(math.ceil(cfg.max_tokens / tokens_per_step))
    if cfg.minutes:
        per_step = micro_step_s * cfg.grad_accum
        if cfg.eval_interval:
            per_step += eval_tokens / 3 * (micro_step_s / micro_tokens) / cfg.eval_interval
        candidates.append(int(cfg.minutes * 60 * 0.97 / per_step))
    if not candidates:
        candidates.append(math.ceil(epoch_tokens / tokens_per_step))
    return max(1, min(candidates))


def train(model, batches: PackedBatches, out_dir: Path, cfg: TrainConfig, val_shard: TokenShard | None = None,
          loss_fn=causal_lm_loss, resume: bool = False) -> tuple[torch.nn.Module, TrainState]:
    """Train `model` (whose frozen parameters stay untouched) on `batches`; returns the unwrapped model.

    `out_dir/checkpoint` holds the resumable state; `out_dir/metrics.jsonl` the loss and bpb curve.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    distributed_state()
    accelerator = Accelerator(mixed_precision=_precision(cfg), cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    if cfg.compile:
        model = torch.compile(model)
    optimizer = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    world, rank = accelerator.num_processes, accelerator.process_index
    tokens_per_step = batches.batch_size * batches.context * cfg.grad_accum * world
    state = TrainState()
    ckpt = out_dir / CHECKPOINT
    if resume and (ckpt / "train_state.json").exists():
        state = TrainState(**json.loads((ckpt / "train_state.json").read_text()))
        state.resumed_from.append(state.step)
    else:
        resume = False
        eval_tokens = min(cfg.eval_docs, val_shard.meta["documents"]) * (
            val_shard.meta["tokens"] / val_shard.meta["documents"]) if val_shard else 0.0
        micro_s = _timed_micro_steps(model, batches, accelerator, loss_fn) if cfg.minutes else None
        state.total_steps = plan_steps(cfg, tokens_per_step, batches.tokens_per_epoch, micro_s,
                                       batches.batch_size * batches.context, eval_tokens)
        if world > 1:  # step times differ between processes: all follow the main process's plan
            state.total_steps = broadcast_object_list([state.total_steps])[0]
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(200, max(1, state.total_steps // 20))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, state.total_steps,
                                                            min_lr_rate=cfg.min_lr_ratio)
    accelerator.register_for_checkpointing(scheduler)
    if resume:
        accelerator.load_state(str(ckpt))
    _truncate_metrics(out_dir / METRICS, state.step, accelerator)

    def validate() -> float | None:
        if val_shard is None:
            return None
        bpb = None
        if accelerator.is_main_process:
            bpb = evaluate_bpb(accelerator.unwrap_model(model), val_shard, max_docs=cfg.eval_docs)["bpb"]
        accelerator.wait_for_everyone()
        return bpb

    def save_checkpoint():
        accelerator.wait_for_everyone()
        tmp = [tempfile.mkdtemp(prefix=CHECKPOINT + ".tmp-", dir=out_dir) if accelerator.is_main_process else ""]
        tmp_name = broadcast_object_list(tmp)[0] if world > 1 else tmp[0]  # every process writes its RNG state
        accelerator.save_state(tmp_name)
        accelerator.wait_for_everyone()  # every process's RNG file is in the folder before it moves
        if accelerator.is_main_process:
            write_json_atomic(Path(tmp_name) / "train_state.json", asdict(state))
            replace_dir(Path(tmp_name), ckpt)
        accelerator.wait_for_everyone()

    bar = tqdm(total=state.total_steps, initial=state.step, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    model.train()
    started, last_save = time.time() - state.elapsed_s, time.time()
    postfix = {"loss": "-", "tok_s": "-", "val_bpb": "-"}
    window_loss, window_steps, window_tokens, window_t0 = torch.zeros((), device=accelerator.device), 0, 0, time.time()
    autocast = accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()
    while state.step < state.total_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum):
            batch = batches.batch(state.step * cfg.grad_accum + micro, rank, world).to(accelerator.device)
            sync = accelerator.no_sync(model) if micro < cfg.grad_accum - 1 else nullcontext()
            with sync, autocast:
                loss = loss_fn(model, batch)
                accelerator.backward(loss / cfg.grad_accum)
            step_loss += loss.detach() / cfg.grad_accum
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens_per_step
        window_loss += step_loss
        window_steps += 1
        window_tokens += tokens_per_step
        bar.update(1)

        log_now = state.step % cfg.log_interval == 0 or state.step == state.total_steps
        if log_now:
            loss_mean = accelerator.reduce(window_loss, "mean").item() / window_steps
            dt = time.time() - window_t0
            record = {"step": state.step, "tokens": state.tokens, "loss": round(loss_mean, 5),
                      "lr": scheduler.get_last_lr()[0], "tokens_per_s": round(window_tokens / max(dt, 1e-9), 1),
                      "elapsed_s": round(time.time() - started, 2)}
            postfix.update(loss=f"{loss_mean:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.set_postfix(postfix)
            _append_metrics(out_dir / METRICS, record, accelerator)
            window_loss.zero_()
            window_steps, window_tokens, window_t0 = 0, 0, time.time()
        if (cfg.eval_interval and state.step % cfg.eval_interval == 0) or state.step == state.total_steps:
            bpb = validate()
            if bpb is not None:
                state.val_bpb = bpb
                _append_metrics(out_dir / METRICS, {"step": state.step, "tokens": state.tokens, "val_bpb": bpb},
                                accelerator)
                postfix["val_bpb"] = f"{bpb:.3f}"
                bar.set_postfix(postfix)
        state.elapsed_s = time.time() - started
        out_of_time = cfg.minutes is not None and state.elapsed_s > cfg.minutes * 60 * 1.05
        if (state.step % cfg.checkpoint_interval == 0 or time.time() - last_save > 300
                or state.step == state.total_steps or out_of_time):
            save_checkpoint()
            last_save = time.time()
        if out_of_time:  # a hard stop: the step estimate was too optimistic
            break
    bar.close()
    return accelerator.unwrap_model(model), state


def _append_metrics(path: Path, record: dict, accelerator) -> None:
    if accelerator.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int, accelerator) -> None:
    """A resumed run restarts from its checkpoint: drop records logged after it, so the curve has no
    duplicates. A fresh run starts a fresh file."""
    if not accelerator.is_main_process or not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def clear_run(out_dir: Path) -> None:
    """Remove a previous run's resumable state and metrics (a fresh, non-resumed run)."""
    shutil.rmtree(Path(out_dir) / CHECKPOINT, ignore_errors=True)
    (Path(out_dir) / METRICS).unlink(missing_ok=True)
    for p in Path(out_dir).glob(CHECKPOINT + ".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
