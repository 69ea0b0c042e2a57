"""The demo's defaults follow the machine: the tiny preset for 6 minutes a stage on the CPU, the small one
for 1.5 minutes at batch 64 on a GPU; what the user sets wins on either."""
import torch

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
