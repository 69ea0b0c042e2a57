import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from expandlm.corpus import load_corpus
from expandlm.domains import get_domain
from expandlm.model import PRESETS, build_model
from expandlm.shards import PackedBatches, build_shard
from expandlm.tokenizer import train_bpe
from expandlm.train import TrainConfig, plan_steps, read_metrics, train


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
    curve = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in curve if "loss" in r]
    assert state.step == 40 and state.tokens == 40 * 8 * 32
    assert losses[-1] < losses[0] - 1.0
    assert [r["step"] for r in curve if "val_bpb" in r] == [20, 40]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert (tmp_path / "run" / "checkpoint" / "train_state.json").exists()


def test_plan_steps_budgets():
    cfg = TrainConfig(max_steps=100, max_tokens=10_000)
    assert plan_steps(cfg, tokens_per_step=1000, epoch_tokens=10**9) == 10
    assert plan_steps(TrainConfig(), tokens_per_step=1000, epoch_tokens=25_500) == 26  # one epoch
    minutes = TrainConfig(minutes=1, eval_interval=0)
    assert plan_steps(minutes, 1000, 10**9, micro_step_s=0.5) == int(60 * 0.97 / 0.5)
    with_eval = TrainConfig(minutes=1, eval_interval=10)
    assert plan_steps(with_eval, 1000, 10**9, micro_step_s=0.5, micro_tokens=1000, eval_tokens=30_000) < 116


def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "expandlm", "train", "--domain", "stories", "--data", str(data), "--preset", "nano",
            "--max-steps", "400", "--batch-size", "4", "--log-interval", "1", "--checkpoint-interval", "7",
            "--eval-interval", "100", "--eval-docs", "5", "--no-progress", "--out", str(out), *extra]


def _curve(out):
    return [(r["step"], r.get("loss"), r.get("val_bpb")) for r in read_metrics(out)]


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
           "--out", str(tmp_path / "ddp")]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    curve = read_metrics(tmp_path / "ddp")
    assert curve[-1]["step"] == 6 and curve[-1]["tokens"] == 6 * 4 * 128 * 2  # both processes' samples
    assert {p.name for p in (tmp_path / "ddp" / "checkpoint").glob("random_states_*")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").config.model_type == "llama"
