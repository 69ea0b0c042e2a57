import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from expandlm.data.corpus import load_corpus
from expandlm.domains import get_domain
from expandlm.errors import Stopped, UserError
from expandlm.model.llama import PRESETS, build_model
from expandlm.data.shards import PackedBatches, build_shard
from expandlm.data.tokenizer import train_bpe
from expandlm.run_folder import RunFolder
from expandlm.training import loop
from expandlm.training.loop import (CosinePlan, TrainConfig, activation_bytes, batch_windows, causal_lm_loss, passes,
                                    plan_steps, planned_tokens, replan_steps, train)


@pytest.fixture
def setup(stories_file, tmp_path):
    corpus = load_corpus(stories_file, get_domain("stories"))
    tok = train_bpe(corpus.documents, 300)
    shard = build_shard(corpus, tok, tmp_path)
    return tok, shard


def test_loss_falls_and_frozen_tensors_stay_bit_identical(setup, tmp_path):
    tok, shard = setup
    model = build_model(PRESETS["nano"], tok, seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".layers.0." in n}
    for n, p in model.named_parameters():
        p.requires_grad = n not in frozen
    cfg = TrainConfig(max_steps=40, batch_size=8, lr=3e-3, eval_interval=20, progress=False, log_interval=5)
    model, state = train(model, PackedBatches([shard], 32, 8, 0), tmp_path / "run", cfg, val_shard=shard)
    curve = RunFolder(tmp_path / "run").metrics()
    losses = [r["loss"] for r in curve if "loss" in r]
    assert state.step == 40 and state.tokens == 40 * 8 * 32
    assert losses[-1] < losses[0] - 1.0
    assert [r["step"] for r in curve if "val_bpb" in r] == [20, 40]
    for n, p in model.named_parameters():
        if n in frozen:  # the model comes back on the training device, the copies stayed on the CPU
            assert torch.equal(p.cpu(), frozen[n]), n
    assert (tmp_path / "run" / "checkpoint" / "train_state.json").exists()


def test_bf16_autocast_trains_several_steps_with_gradient_accumulation(setup, tmp_path):
    """bf16 autocast (the GPU default, and `--precision bf16` on the CPU) across several optimizer steps of
    several micro-batches each: each micro-step enters a fresh autocast context."""
    tok, shard = setup
    model = build_model(PRESETS["nano"], tok, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(max_steps=4, grad_accum=3, batch_size=4, lr=3e-3, eval_interval=0, progress=False,
                      log_interval=1, precision="bf16")
    model, state = train(model, PackedBatches([shard], 32, 4, 0), tmp_path / "run", cfg)
    losses = [r["loss"] for r in RunFolder(tmp_path / "run").metrics() if "loss" in r]
    assert state.step == 4 and state.tokens == 4 * 3 * 4 * 32
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model
    assert any(not torch.equal(p.detach().cpu(), before[n]) for n, p in model.named_parameters())
    # what comes back computes as its saved weights do when loaded (fp32 here), not under the run's
    # autocast: its final bpb is the one every later command measures
    plain = build_model(PRESETS["nano"], tok, seed=1)
    plain.load_state_dict(model.state_dict())
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, plain.eval()(ids).logits)


def test_the_default_batch_is_32_windows_at_most_8192_tokens():
    assert [batch_windows(TrainConfig(), c) for c in (128, 256, 512, 1024, 16384)] == [32, 32, 16, 8, 1]
    assert batch_windows(TrainConfig(batch_size=5), 1024) == 5


def test_a_batch_splits_into_passes_by_its_activations_and_trains_as_one_pass(setup, tmp_path, monkeypatch):
    """SmolLM2-135M's shape at 1,024 tokens takes a pass a window; the tiny presets never split. A run whose
    batches are split computes the curve of one whose are not, within rounding."""
    smol = type("M", (), {"config": type("C", (), {"hidden_size": 576, "num_hidden_layers": 30,
                                                   "intermediate_size": 1536})})()
    assert passes(8, activation_bytes(smol, 1024)) == 8
    assert passes(32, activation_bytes(build_model(PRESETS["tiny"], train_bpe(["a b"] * 9, 300)), 256)) == 1
    tok, shard = setup
    curves, rows = [], []

    def counted(model, batch):
        rows.append(len(batch))
        return causal_lm_loss(model, batch)
    for budget in (loop.ACTIVATION_BUDGET, 1):  # 1 byte: a pass per window
        monkeypatch.setattr(loop, "ACTIVATION_BUDGET", budget)
        cfg = TrainConfig(max_steps=6, batch_size=4, grad_accum=2, lr=3e-3, eval_interval=0, progress=False,
                          log_interval=1, precision="no")  # fp32: equal within rounding (bf16's is coarser)
        model, _ = train(build_model(PRESETS["nano"], tok, seed=0), PackedBatches([shard], 32, 4, 0),
                         tmp_path / f"run{budget}", cfg, loss_fn=counted)
        curves.append(([r["loss"] for r in RunFolder(tmp_path / f"run{budget}").metrics()],
                       torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert rows == [4] * 12 + [1] * 48  # 6 steps of 2 micro-batches: whole, then a window a pass
    assert curves[0][0] == pytest.approx(curves[1][0], abs=1e-4)
    assert torch.allclose(curves[0][1], curves[1][1], atol=1e-4)


@pytest.mark.parametrize("speedup,picked", [(0.05, "no"), (1.2, "no"), (2.5, "bf16")])
def test_auto_precision_on_a_cpu_is_bf16_only_where_its_matmuls_are_faster(monkeypatch, speedup, picked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loop, "cpu_bf16_speedup", lambda: speedup)
    assert loop.resolved_precision(TrainConfig()) == picked
    assert loop.resolved_precision(TrainConfig(precision="no")) == "no"


def test_the_cpu_bf16_probe_measures_and_says_what_it_picked(capsys):
    loop.cpu_bf16_speedup.cache_clear()
    speedup = loop.cpu_bf16_speedup(n=64, repeats=2)
    assert speedup > 0 and ("bf16 autocast" if speedup >= loop.BF16_CPU_SPEEDUP else "fp32") in capsys.readouterr().out


def test_plan_steps_budgets():
    cfg = TrainConfig(max_steps=100, max_tokens=10_000)
    assert plan_steps(cfg, tokens_per_step=1000, epoch_tokens=10**9) == 10
    assert plan_steps(TrainConfig(), tokens_per_step=1000, epoch_tokens=25_500) == 26  # one epoch
    minutes = TrainConfig(minutes=1, eval_interval=0)
    assert plan_steps(minutes, 1000, 10**9, micro_step_s=0.5) == int(60 * 0.97 / 0.5)
    with_eval = TrainConfig(minutes=1, eval_interval=10)
    assert plan_steps(with_eval, 1000, 10**9, micro_step_s=0.5, micro_tokens=1000, eval_tokens=30_000) < 116


def test_planned_tokens_are_the_fixed_budgets_or_an_epoch_and_unknown_under_minutes():
    assert planned_tokens(TrainConfig(max_steps=100, max_tokens=10_000), 1000, 10**9) == 10_000
    assert planned_tokens(TrainConfig(max_tokens=10_500), 1000, 10**9) == 11_000  # whole steps
    assert planned_tokens(TrainConfig(), 1000, 25_500) == 26_000
    assert planned_tokens(TrainConfig(minutes=1, max_steps=5), 1000, 10**9) is None


def test_replan_steps_follows_the_pace_within_the_caps():
    cfg = TrainConfig(minutes=1)  # 60 s
    assert replan_steps(cfg, 100, elapsed_s=30, step_s=0.3) == 200
    assert replan_steps(cfg, 100, elapsed_s=30, step_s=0.9) == 133  # 3x slower: fewer steps fit
    assert replan_steps(cfg, 100, 30, 0.3, cap=150) == 150  # max_steps / max_tokens still bound it
    assert replan_steps(cfg, 100, 30, 0.3, reserve_s=15) == 150  # time kept for the final validation
    assert replan_steps(cfg, 100, 59.8, 0.3) == 101  # the end nearest the budget: one more step
    assert replan_steps(cfg, 100, 59.9, 0.3) == 100  # under half a step left: stop now
    assert replan_steps(cfg, 100, 75, 0.3) == 100


def test_cosine_plan_is_the_fixed_schedule_and_follows_a_moved_end():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fixed = get_cosine_with_min_lr_schedule_with_warmup(opt, 10, 110, min_lr_rate=0.1).lr_lambdas[0]
    plan = CosinePlan(warmup=10, total=110, min_ratio=0.1)
    assert [plan(s) for s in range(111)] == pytest.approx([fixed(s) for s in range(111)], abs=1e-12)
    plan.total = 60  # re-planned shorter: the decay ends there and stays at the floor
    assert plan(60) == pytest.approx(0.1) and plan(70) == pytest.approx(0.1) and plan(35) < fixed(35)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan)
    for _ in range(20):
        opt.step()
        sched.step()
    resumed = torch.optim.lr_scheduler.LambdaLR(opt, CosinePlan(1, 2, 0.5))
    resumed.load_state_dict(sched.state_dict())  # the warmup and plan travel with the checkpoint
    assert vars(resumed.lr_lambdas[0]) == {"warmup": 10, "total": 60, "min_ratio": 0.1}
    assert resumed.get_last_lr() == sched.get_last_lr()


class SimulatedClock:
    """A clock whose time passes only in training passes: each micro-step costs `cost(now)` seconds.
    Makes a minutes run deterministic, with the slowdowns a busy machine would cause."""

    def __init__(self, cost):
        self.now, self.cost = 0.0, cost

    def __call__(self) -> float:
        return self.now

    def loss_fn(self, model, batch):
        self.now += self.cost(self.now)
        return causal_lm_loss(model, batch)


@pytest.fixture
def one_thread():
    """nano steps gain nothing from a second thread, and on a busy machine spinning threads make them crawl"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BUDGET_S = 2.0
SLOWDOWNS = {"3x slower halfway": lambda t: 0.01 if t < BUDGET_S / 2 else 0.03,
             "3x slower calibration": lambda t: 0.03 if t < 0.18 else 0.01}  # the first 6 passes calibrate


def _minutes_run(shard, tok, out, clock, resume=False, **cfg):
    cfg = TrainConfig(minutes=BUDGET_S / 60, batch_size=8, lr=3e-3, eval_interval=0, eval_docs=5,
                      log_interval=1, progress=False, **cfg)
    return train(build_model(PRESETS["nano"], tok, seed=0), PackedBatches([shard], 32, 8, 0), out, cfg,
                 val_shard=shard, loss_fn=clock.loss_fn, resume=resume, clock=clock)


def _assert_ends_at_the_budget(state, out):
    assert BUDGET_S * 0.97 <= state.elapsed_s <= BUDGET_S * 1.01
    lrs = [r["lr"] for r in RunFolder(out).metrics() if "lr" in r]
    assert lrs[-1] == pytest.approx(3e-3 * 0.1)  # the decay ends where the run ends
    assert lrs[-3] - 3e-4 < 0.01 * (3e-3 - 3e-4)  # and was planned to: the steps before are near the floor
    assert lrs[len(lrs) // 2] > 0.4 * 3e-3  # not too early either: halfway, the cosine is about halfway down
    assert RunFolder(out).metrics()[-1] == {"step": state.step, "tokens": state.tokens, "val_bpb": state.val_bpb}
    assert json.loads((out / "checkpoint" / "train_state.json").read_text())["step"] == state.step


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("cost", SLOWDOWNS.values(), ids=SLOWDOWNS.keys())
def test_minutes_budget_replans_when_the_pace_changes(setup, tmp_path, cost):
    tok, shard = setup
    _, state = _minutes_run(shard, tok, tmp_path / "run", SimulatedClock(cost))
    _assert_ends_at_the_budget(state, tmp_path / "run")
    assert state.total_steps == state.step


@pytest.mark.usefixtures("one_thread")
def test_resumed_minutes_run_replans_the_time_left(setup, tmp_path):
    tok, shard = setup
    killed = SimulatedClock(SLOWDOWNS["3x slower halfway"])

    def killed_loss(model, batch):
        if killed.now > 1.2:
            raise KeyboardInterrupt  # a lost machine, after the checkpoint at step 100
        return SimulatedClock.loss_fn(killed, model, batch)
    killed.loss_fn = killed_loss
    with pytest.raises(KeyboardInterrupt):
        _minutes_run(shard, tok, tmp_path / "run", killed, checkpoint_interval=50)
    at = json.loads((tmp_path / "run" / "checkpoint" / "train_state.json").read_text())
    assert at["step"] == 100 and at["total_steps"] > 100
    saved_plan = torch.load(tmp_path / "run" / "checkpoint" / "custom_checkpoint_0.pkl", weights_only=False)
    assert saved_plan["lr_lambdas"] == [{"warmup": 9, "total": at["total_steps"], "min_ratio": 0.1}] * 2  # 2 groups
    _, state = _minutes_run(shard, tok, tmp_path / "run", SimulatedClock(lambda t: 0.03), resume=True,
                            checkpoint_interval=50)  # a new process: its clock starts at 0
    assert state.resumed_from == [100]
    _assert_ends_at_the_budget(state, tmp_path / "run")


def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "expandlm", "train", "--domain", "stories", "--data", str(data), "--preset", "nano",
            "--max-steps", "400", "--batch-size", "4", "--log-interval", "1", "--checkpoint-interval", "7",
            "--eval-interval", "100", "--eval-docs", "5", "--no-progress", "--out", str(out), *extra]


def _curve(out):
    return [(r["step"], r.get("loss"), r.get("val_bpb")) for r in RunFolder(out).metrics()]


@pytest.mark.slow
def test_resume_after_kill_reproduces_the_uninterrupted_curve(stories_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(stories_file, tmp_path / "a"), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_train_cmd(stories_file, tmp_path / "b"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"step": 30,' in metrics.read_text()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: like a lost machine
    proc.wait()
    killed_at = json.loads((tmp_path / "b" / "checkpoint" / "train_state.json").read_text())["step"]
    assert 0 < killed_at < 400
    subprocess.run(_train_cmd(stories_file, tmp_path / "b", "--resume"), check=True, env=env, capture_output=True)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["resumed_from"] == [killed_at] and run["steps"] == 400
    assert _curve(tmp_path / "b") == _curve(tmp_path / "a")
    assert len(_curve(tmp_path / "a")) == 400 + 4


@pytest.mark.slow
def test_two_process_data_parallel_run(stories_file, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "expandlm", "train",
           "--domain", "stories", "--data", str(stories_file), "--preset", "nano", "--max-steps", "6",
           "--batch-size", "4", "--eval-interval", "3", "--eval-docs", "5", "--log-interval", "3", "--no-progress",
           "--precision", "no", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert "training: 2 processes on cpu, fp32" in done.stdout  # said once, by the main process
    assert done.stdout.count("training: ") == 1
    details = RunFolder(tmp_path / "ddp").record().details
    assert (details["world_size"], details["device"], details["precision"]) == (2, "cpu", "no")
    curve = RunFolder(tmp_path / "ddp").metrics()
    assert curve[-1]["step"] == 6 and curve[-1]["tokens"] == 6 * 4 * 128 * 2  # both processes' samples
    assert {p.name for p in (tmp_path / "ddp" / "checkpoint").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").config.model_type == "llama"


def _killed_after(micro_steps: int):
    """A loss function that stops the run (like a lost machine) at its `micro_steps`-th call."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        if len(calls) > micro_steps:
            raise KeyboardInterrupt
        return causal_lm_loss(model, batch)
    return loss


def _short_run(shard, tok, out, resume=False, loss_fn=causal_lm_loss, **cfg):
    cfg = TrainConfig(**{"max_steps": 17, "batch_size": 4, "lr": 3e-3, "eval_interval": 0, "progress": False,
                         "log_interval": 5, "checkpoint_interval": 7, **cfg})
    return train(build_model(PRESETS["nano"], tok, seed=0), PackedBatches([shard], 32, 4, 0), out, cfg,
                 loss_fn=loss_fn, resume=resume)


def test_logged_loss_after_resume_between_log_steps_matches_the_uninterrupted_run(setup, tmp_path):
    tok, shard = setup
    _short_run(shard, tok, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):  # killed at step 9, after the checkpoint at step 7
        _short_run(shard, tok, tmp_path / "b", loss_fn=_killed_after(8))
    assert json.loads((tmp_path / "b" / "checkpoint" / "train_state.json").read_text())["step"] == 7
    _, state = _short_run(shard, tok, tmp_path / "b", resume=True)
    assert state.resumed_from == [7]  # 7 is not a multiple of the log interval (5)
    curve = lambda out: [(r["step"], r["loss"]) for r in RunFolder(out).metrics()]  # noqa: E731
    assert curve(tmp_path / "b") == curve(tmp_path / "a") and [s for s, _ in curve(tmp_path / "a")] == [5, 10, 15, 17]


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_from_the_beginning(setup, tmp_path):
    tok, shard = setup
    _short_run(shard, tok, tmp_path / "a", log_interval=1)
    with pytest.raises(KeyboardInterrupt):
        _short_run(shard, tok, tmp_path / "b", log_interval=1, loss_fn=_killed_after(5))
    assert not (tmp_path / "b" / "checkpoint").exists() and len(RunFolder(tmp_path / "b").metrics()) == 5
    _, state = _short_run(shard, tok, tmp_path / "b", resume=True, log_interval=1)
    assert state.resumed_from == [0] and state.step == 17
    assert RunFolder(tmp_path / "b").metrics() == [
        {**r, "tokens_per_s": r2["tokens_per_s"], "elapsed_s": r2["elapsed_s"]}
        for r, r2 in zip(RunFolder(tmp_path / "a").metrics(), RunFolder(tmp_path / "b").metrics())]


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "random_states_0.pkl",
                                  "custom_checkpoint_0.pkl", "train_state.json"])
def test_a_truncated_checkpoint_file_is_named_and_never_resumed_from(setup, tmp_path, name):
    tok, shard = setup
    _short_run(shard, tok, tmp_path / "run", max_steps=7)
    path = tmp_path / "run" / "checkpoint" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match=rf"checkpoint/{name}\b.*(truncated|invalid JSON)"):
        _short_run(shard, tok, tmp_path / "run", max_steps=7, resume=True)


def _signalled_at(micro_steps: int, signum: int):
    """A loss function that sends this process `signum` (as a scheduler or Ctrl-C would) during its
    `micro_steps`-th call."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        if len(calls) == micro_steps:
            os.kill(os.getpid(), signum)
        return causal_lm_loss(model, batch)
    return loss


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_at_the_step_boundary_and_the_resumed_run_is_the_uninterrupted_one(setup, tmp_path, signum):
    tok, shard = setup
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job
    _short_run(shard, tok, tmp_path / "a")
    with pytest.raises(Stopped, match=rf"stopped by {signum.name} at step 9 of 17, saved in .*b/checkpoint; "
                                      r"the same command with --resume") as stopped:
        _short_run(shard, tok, tmp_path / "b", loss_fn=_signalled_at(9, signum))  # checkpoints at 7 and 14
    assert stopped.value.signum == signum
    assert json.loads((tmp_path / "b" / "checkpoint" / "train_state.json").read_text())["step"] == 9  # not 7
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # the loop's are gone
    _, state = _short_run(shard, tok, tmp_path / "b", resume=True)
    assert state.resumed_from == [9] and state.step == 17
    curve = lambda out: [(r["step"], r["loss"]) for r in RunFolder(out).metrics()]  # noqa: E731
    assert curve(tmp_path / "b") == curve(tmp_path / "a")
    a, b = (load_file(p / "checkpoint" / "model.safetensors") for p in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_at_once(setup, tmp_path):
    tok, shard = setup
    calls = []

    def loss(model, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return causal_lm_loss(model, batch)
    with pytest.raises(KeyboardInterrupt):
        _short_run(shard, tok, tmp_path / "b", loss_fn=loss)
    assert len(calls) == 3 and not (tmp_path / "b" / "checkpoint").exists()


def test_a_full_disk_ends_in_one_line_and_the_last_checkpoint_is_kept(setup, tmp_path, monkeypatch):
    """A full disk once gave a `SafetensorError ... No space left on device` traceback (issue 30)."""
    from accelerate import Accelerator
    from safetensors import SafetensorError
    tok, shard = setup
    saves, save_state = [], Accelerator.save_state

    def fills_the_disk(self, output_dir, **kwargs):
        saves.append(output_dir)
        save_state(self, output_dir, **kwargs)
        if len(saves) == 2:  # the checkpoint at step 14, its files half written
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
    monkeypatch.setattr(Accelerator, "save_state", fills_the_disk)
    with pytest.raises(UserError, match=r"b/checkpoint: no space left on the device while writing it; what was there "
                                        r"before is kept \(a run continues from its last checkpoint with --resume"):
        _short_run(shard, tok, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "checkpoint" / "train_state.json").read_text())["step"] == 7
    assert sorted(os.listdir(tmp_path / "b")) == ["checkpoint", "metrics.jsonl"]  # no temp folder left
    monkeypatch.undo()
    _short_run(shard, tok, tmp_path / "a")
    _, state = _short_run(shard, tok, tmp_path / "b", resume=True)
    assert state.resumed_from == [7] and RunFolder(tmp_path / "b").metrics() == [
        {**r, "tokens_per_s": r2["tokens_per_s"], "elapsed_s": r2["elapsed_s"]}
        for r, r2 in zip(RunFolder(tmp_path / "a").metrics(), RunFolder(tmp_path / "b").metrics())]


def test_a_metrics_line_cut_short_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1.0}\n\n{"step": 7, "loss": 0.9}\n{"step": 1')
    loop._truncate_metrics(path, 7)
    assert path.read_text() == '{"step": 5, "loss": 1.0}\n{"step": 7, "loss": 0.9}\n'


def _wait_for_step(metrics, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and f'"step": {step},' in metrics.read_text()):
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_from_a_scheduler_saves_and_says_how_to_resume(stories_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_train_cmd(stories_file, tmp_path / "b"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path / "b" / "metrics.jsonl", 30)
    proc.send_signal(signal.SIGTERM)  # what docker stop, Kubernetes and slurm send before they kill
    _, err = proc.communicate(timeout=120)
    saved = json.loads((tmp_path / "b" / "checkpoint" / "train_state.json").read_text())["step"]
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"expandlm: stopped by SIGTERM at step {saved} of 400" in err and "--resume" in err
    assert saved == RunFolder(tmp_path / "b").metrics()[-1]["step"]  # the step it stopped at, not the last checkpoint
    subprocess.run(_train_cmd(stories_file, tmp_path / "b", "--resume"), check=True, env=env, capture_output=True)
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["resumed_from"] == [saved] and run["steps"] == 400


def _children(pid: int) -> list[int]:
    found = []
    for stat in os.listdir("/proc"):
        try:
            if stat.isdigit() and int(open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat))
        except (OSError, IndexError, ValueError):
            pass
    return found


def _running(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through /proc")
def test_workers_stop_when_their_launcher_is_killed(stories_file, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *_train_cmd(stories_file, tmp_path / "d")[1:]]
    launcher = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    _wait_for_step(tmp_path / "d" / "metrics.jsonl", 3, timeout=240)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    launcher.kill()  # kill -9: no chance to stop its workers
    launcher.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(map(_running, workers)):
        time.sleep(0.2)
    alive = [w for w in workers if _running(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, "workers trained on as orphans"
    saved = json.loads((tmp_path / "d" / "checkpoint" / "train_state.json").read_text())["step"]
    assert saved == RunFolder(tmp_path / "d").metrics()[-1]["step"] < 400  # both stopped, saved where they stopped


def test_report_to_tensorboard_writes_the_curve_tensorboard_reads(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tok, shard = setup
    cfg = TrainConfig(max_steps=6, batch_size=4, eval_interval=3, log_interval=2, progress=False,
                      report_to="tensorboard")
    train(build_model(PRESETS["nano"], tok, seed=0), PackedBatches([shard], 32, 4, 0), tmp_path / "run", cfg,
          val_shard=shard)
    curve = RunFolder(tmp_path / "run").metrics()
    events = EventAccumulator(str(tmp_path / "run" / loop.TRACKER_DIR / loop.TRACKER_PROJECT)).Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in curve if "loss" in r]
    bpb = [(e.step, e.value) for e in events.Scalars("eval/bpb")]
    assert bpb == [(r["step"], pytest.approx(r["val_bpb"], rel=1e-6)) for r in curve if "val_bpb" in r]
    assert {"train/learning_rate", "train/tokens_per_s"} <= set(events.Tags()["scalars"])


def test_report_to_wandb_runs_offline_without_a_network(setup, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tok, shard = setup
    cfg = TrainConfig(max_steps=4, batch_size=4, eval_interval=0, log_interval=2, progress=False, report_to="wandb")
    train(build_model(PRESETS["nano"], tok, seed=0), PackedBatches([shard], 32, 4, 0), tmp_path / "run", cfg,
          val_shard=shard)
    runs = list((tmp_path / "run" / loop.TRACKER_DIR / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the run's records, for `wandb sync` later


def test_report_to_a_tracker_that_is_not_installed_is_one_line(setup, tmp_path, monkeypatch):
    tok, shard = setup
    monkeypatch.setattr(loop, "is_tensorboard_available", lambda: False)
    with pytest.raises(UserError, match="--report-to tensorboard needs the tensorboard package: pip install"):
        train(build_model(PRESETS["nano"], tok, seed=0), PackedBatches([shard], 32, 4, 0), tmp_path / "run",
              TrainConfig(max_steps=1, progress=False, report_to="tensorboard"))
