"""The demo's defaults follow the machine: the tiny preset for 6 minutes a stage on the CPU, the small one
for 1.5 minutes at batch 64 on a GPU; what the user sets wins on either."""
import torch

from expandlm.records import RunRecord
from expandlm.studies.demo import DemoConfig
from expandlm.training.loop import TrainConfig


def test_the_cpu_demo_is_the_tiny_preset_for_six_minutes_a_stage(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = DemoConfig()
    assert cfg.preset == "tiny" and cfg.train.minutes == 6.0 and cfg.train.batch_size == TrainConfig().batch_size


def test_a_gpu_demo_is_the_small_preset_for_a_minute_and_a_half_a_stage(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = DemoConfig()
    assert cfg.preset == "small" and cfg.train.minutes == 1.5 and cfg.train.batch_size == 64
    assert DemoConfig(preset="base").preset == "base"


def _stage(tokens: int, trainable: int = 1_468_032, seconds: float = 360.0, **details) -> RunRecord:
    return RunRecord("expert", {}, 0, {}, status="done", trainable_params=trainable, tokens=tokens,
                     train_seconds=seconds, details=details)


def test_a_stage_that_bought_too_few_tokens_says_so_and_what_to_do(monkeypatch):
    from expandlm.studies.demo import FEW_TOKENS_PER_PARAMETER, too_few_tokens

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = DemoConfig()
    # the measured busy-machine demo: 139k tokens in 6 minutes, a third of two cores
    said = too_few_tokens("stories", _stage(139_264, cpu_share=0.31, cpu_threads=2), cfg)
    assert "trained only 139,264 tokens in 6 minutes" in said and "0.09 per trainable parameter" in said
    assert "31% of its 2 threads' CPU time: the machine was busy" in said
    needed = 800_000  # 0.5 × 1,468,032 rounded up to a hundred thousand
    assert f"at least {needed:,}" in said and f"--minutes {-(-needed * 360 // 139_264 // 60)}" in said
    assert "new --out" in said
    assert "busy" not in too_few_tokens("stories", _stage(139_264, cpu_share=0.97, cpu_threads=2), cfg)
    # the measured quiet-machine demo bought enough
    assert too_few_tokens("stories", _stage(2_211_840), cfg) is None
    assert too_few_tokens("+recipes", _stage(2_056_192, trainable=664_192), cfg) is None
    enough = int(FEW_TOKENS_PER_PARAMETER * 1_468_032) + 1
    assert too_few_tokens("stories", _stage(enough), cfg) is None and too_few_tokens("stories", _stage(enough - 2), cfg)
