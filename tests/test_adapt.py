"""adapt end to end: a killed run resumes exactly, and two processes write one folder."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from expandlm.run_folder import RunFolder
from expandlm.serving import load_served

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tests.conftest import RECIPES, STORIES, write_jsonl
    root = tmp_path_factory.mktemp("adapt")
    stories = write_jsonl(root / "stories.jsonl", [{"text": t} for t in STORIES])
    recipes = write_jsonl(root / "recipes.jsonl", RECIPES)
    subprocess.run([sys.executable, "-m", "expandlm", "train", "--domain", "stories", "--data", str(stories),
                    "--preset", "nano", "--max-steps", "4", "--batch-size", "4", "--eval-interval", "0",
                    "--no-progress", "--out", str(root / "base")], check=True, env=ENV, capture_output=True)
    return root, recipes


def _adapt_cmd(base, out, *extra, launcher=(sys.executable, "-m")):
    root, recipes = base
    return [*launcher, "expandlm", "adapt", "--base", str(root / "base"), "--strategy", "expand_paths",
            "--option", "new_blocks=1", "--domain", "recipes", "--data", str(recipes), "--batch-size", "4",
            "--eval-interval", "50", "--eval-docs", "5", "--log-interval", "1", "--checkpoint-interval", "7",
            "--no-progress", "--out", str(out), *extra]


def _curve(out):
    return [(r["step"], r.get("loss"), r.get("val_bpb")) for r in RunFolder(out).metrics()]


@pytest.mark.slow
def test_adapt_resume_after_kill_reproduces_the_uninterrupted_run(base, tmp_path):
    steps = ["--max-steps", "150"]
    subprocess.run(_adapt_cmd(base, tmp_path / "a", *steps), check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen(_adapt_cmd(base, tmp_path / "b", *steps), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics, deadline = tmp_path / "b" / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"step": 20,' in metrics.read_text()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((tmp_path / "b" / "checkpoint" / "train_state.json").read_text())["step"]
    assert 0 < killed_at < 150
    resumed = subprocess.run([sys.executable, "-m", "expandlm", "adapt", "--resume", "--out", str(tmp_path / "b")],
                             env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    record = RunFolder(tmp_path / "b").record()
    assert record["status"] == "done" and record["resumed_from"] == [killed_at] and record["steps"] == 150
    assert _curve(tmp_path / "b") == _curve(tmp_path / "a")
    assert record["bpb"] == RunFolder(tmp_path / "a").record()["bpb"]


@pytest.mark.slow
def test_adapt_under_two_processes_writes_one_folder(base, tmp_path):
    out = tmp_path / "ddp"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m")
    done = subprocess.run(_adapt_cmd(base, out, "--max-steps", "6", launcher=launcher), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = RunFolder(out).record()
    assert record["status"] == "done" and record["steps"] == 6
    assert record["tokens"] == 6 * 4 * 128 * 2  # both processes' samples
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp leftovers
    served = load_served(out)
    ids = torch.tensor([[served.tokenizer.bos_token_id, served.tokenizer.convert_tokens_to_ids("<|stories|>"), 70]])
    base_model = load_served(base[0] / "base").model
    with torch.no_grad():
        assert torch.equal(served.for_domain("stories")(input_ids=ids).logits, base_model(input_ids=ids).logits)
