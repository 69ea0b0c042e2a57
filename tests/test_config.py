"""The typed configuration: validation with clear errors, flags made from fields, YAML files."""
import argparse

import pytest

from expandlm.studies import load_study
from expandlm.config import build, flags, given, load_yaml, parse_text
from expandlm.errors import UserError
from expandlm.training.expert import ExpertSpec
from expandlm.adapt.lora import LoRA
from expandlm.training.loop import TrainConfig


def test_values_are_converted_where_unambiguous_and_refused_otherwise():
    cfg = build(TrainConfig, {"lr": "3e-3", "compile": "false", "betas": [0.9, 0.99], "max_steps": "7"}, "x.yaml")
    assert (cfg.lr, cfg.compile, cfg.betas, cfg.max_steps) == (3e-3, False, (0.9, 0.99), 7)
    with pytest.raises(UserError, match=r"x.yaml: 'max_tokens': input should be a valid integer.*'2e6'"):
        build(TrainConfig, {"max_tokens": "2e6"}, "x.yaml")
    with pytest.raises(UserError, match=r"unknown key 'learning_rate' \(known keys: batch_size"):
        build(TrainConfig, {"learning_rate": 1}, "x.yaml")
    with pytest.raises(UserError, match=r"'batch_size': input should be greater than 0"):
        build(TrainConfig, {"batch_size": 0}, "x.yaml")
    with pytest.raises(UserError, match=r"'domain' is required"):
        build(ExpertSpec, {"data": "d", "out": "o"}, "spec")


def test_a_study_config_is_checked_when_read(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("study: expansion\nold_domain: stories\nnew_domain: recipes\nbase_tokens: 2e6\n")  # YAML reads 2e6 as a string
    with pytest.raises(UserError, match=r"study.yaml: 'base_tokens': input should be a valid integer"):
        load_study(path)
    path.write_text("study: expansion\nold_domain: stories\nnew_domain: recipes\ntrain: {lr: fast}\n")
    with pytest.raises(UserError, match=r"'train.lr': input should be a valid number"):
        load_study(path)
    path.write_text("study: expansion\nold_domain: stories\nnew_domain: recipes\nstrategies: [{name: lora, colour: red}]\n")
    with pytest.raises(UserError, match=r"unknown key 'strategies.0.colour'"):
        load_study(path)
    path.write_text("old_domain: stories\nnew_domain: [recipes\n")
    with pytest.raises(UserError, match=r"study.yaml:\d+: invalid YAML"):
        load_yaml(path)


def test_flags_come_from_the_fields_and_only_given_ones_count():
    parser = argparse.ArgumentParser()
    flags(parser, TrainConfig)
    args = parser.parse_args(["--batch-size", "4", "--no-progress", "--betas", "0.8,0.9"])
    assert given(args, TrainConfig) == {"batch_size": "4", "progress": False, "betas": ["0.8", "0.9"]}
    cfg = build(TrainConfig, given(args, TrainConfig), "flags")
    assert (cfg.batch_size, cfg.progress, cfg.betas, cfg.lr) == (4, False, (0.8, 0.9), TrainConfig().lr)
    assert "--min-lr-ratio" in parser.format_help()


def _help_of(parser, flag: str) -> str:
    action = next(a for a in parser._actions if flag in a.option_strings)
    return action.help


def test_a_flag_shows_the_default_its_command_uses_once():
    import torch
    from expandlm.studies.demo import DemoConfig

    parser = argparse.ArgumentParser()
    flags(parser, TrainConfig, defaults=TrainConfig(minutes=6.0, eval_interval=50))
    assert _help_of(parser, "--minutes").endswith("(default: 6.0)")
    assert _help_of(parser, "--eval-interval").endswith("(default: 50)")
    assert _help_of(parser, "--lr").endswith(f"(default: {TrainConfig().lr})")
    demo = argparse.ArgumentParser()
    flags(demo, DemoConfig)
    preset = _help_of(demo, "--preset")
    assert preset.count("default:") == 1 and "tiny on the CPU" in preset and torch  # its help says what it depends on


def test_list_options_from_the_command_line():
    assert parse_text(LoRA.Options, "target_modules", "q_proj, v_proj") == ["q_proj", "v_proj"]
    options = build(LoRA.Options, {"target_modules": parse_text(LoRA.Options, "target_modules", "q_proj,v_proj"),
                                   "r": "4"}, "--option")
    assert options.target_modules == ["q_proj", "v_proj"] and options.r == 4


def test_an_older_name_of_a_setting_still_works_in_yaml_saved_specs_and_flags():
    from expandlm.adapt.run import AdaptSpec
    base = {"base": "b", "domain": "recipes", "out": "o"}
    assert build(AdaptSpec, {**base, "strategy": "lora"}, "old.yaml").method == "lora"  # a run.json of before
    assert build(AdaptSpec, {**base, "method": "lora"}, "new.yaml").method == "lora"
    with pytest.raises(UserError, match="x.yaml: 'strategy' is the older name of 'method': give one of them"):
        build(AdaptSpec, {**base, "method": "lora", "strategy": "replay"}, "x.yaml")
    parser = argparse.ArgumentParser()
    flags(parser, AdaptSpec)
    for flag in ("--method", "--strategy"):
        assert parser.parse_args([flag, "lora"]).method == "lora"
