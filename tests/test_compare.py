import json
import shutil

import pytest

from expandlm.cli import main
from expandlm.compare import load_config
from expandlm.errors import UserError
from tests.conftest import REPO

REQUIRED = {"strategy", "bpb", "forgetting", "new_domain_gap", "domain_accuracy", "recipe_validity",
            "trainable_params", "total_params", "tokens", "seconds"}


@pytest.mark.slow
def test_smoke_study_runs_every_strategy_and_reuses_finished_stages(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("EXPANDLM_DATA", str(shared_data))
    out = tmp_path / "study"
    assert main(["compare", str(REPO / "configs" / "smoke.yaml"), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    assert {m["strategy"] for m in models} == {"base", "scratch", "full_ft", "lora", "joint", "replay", "ewc",
                                               "expand", "expand_paths"}
    for m in models:
        assert REQUIRED <= set(m), m["label"]
        assert set(m["bpb"]) == {"stories", "recipes"} and all(v > 0 for v in m["bpb"].values())
        assert 0 <= m["recipe_validity_ceiling"] <= 1
    by_label = {m["label"]: m for m in models}
    assert by_label["expand_paths"]["forgetting"] == 0.0  # the old path is untouched, exactly
    assert by_label["lora"]["forgetting"] == 0.0           # adapter off = the base
    assert set(by_label["full_ft"]["domain_accuracy"]) == {"stories", "recipes"}
    assert by_label["expand"]["trainable_params"] < by_label["expand"]["total_params"]
    assert len(results["tokenizer_study"]) == 6
    for name in ("report.md", "samples.json", "bpb_and_forgetting.png", "learning_curves.png", "tokenizer_study.png"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "| full_ft |" in report and "## Tokenizer study" in report

    # a second run reuses every stage: nothing is retrained
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("seed0/*/run.json")}
    capsys.readouterr()
    assert main(["compare", str(REPO / "configs" / "smoke.yaml"), "--out", str(out), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("seed0/*/run.json")} == stamps
    assert "expert (" not in capsys.readouterr().out

    # a stage lost mid-way is redone, the rest kept
    shutil.rmtree(out / "seed0" / "replay")
    (out / "seed0" / "full_ft" / "suite.json").unlink()
    assert main(["compare", str(REPO / "configs" / "smoke.yaml"), "--out", str(out), "--no-progress"]) == 0
    assert (out / "seed0" / "replay" / "run.json").exists() and (out / "seed0" / "full_ft" / "suite.json").exists()


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nstrategies:\n  - {name: full_ft, epochs: 3}\n")
    with pytest.raises(UserError, match=r"bad.yaml: strategies\[0\]: unknown field\(s\) epochs"):
        load_config(bad)
    bad.write_text("preset: tiny\nbase_tokenz: 5\n")
    with pytest.raises(UserError, match="unknown field\\(s\\) base_tokenz"):
        load_config(bad)
    bad.write_text("preset: [tiny\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    bad.write_text("strategies:\n  - {name: expand}\n  - {name: expand}\n")
    with pytest.raises(UserError, match="share a label"):
        load_config(bad)
    bad.write_text("train: {batch: 3}\n")
    with pytest.raises(UserError, match="bad.yaml: train: unknown field"):
        load_config(bad)


def test_shipped_configs_load():
    for name in ("smoke", "stories-recipes", "gpu"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert {s.name for s in cfg.strategies} == {"full_ft", "lora", "joint", "replay", "ewc", "expand",
                                                    "expand_paths"}
