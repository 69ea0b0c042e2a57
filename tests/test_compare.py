import json
import shutil

import pytest

from expandlm.cli import main
from expandlm.compare import load_config
from expandlm.errors import UserError
from tests.conftest import REPO

REQUIRED = {"strategy", "bpb", "forgetting", "new_domain_gap", "domain_accuracy", "validity", "validity_ceiling", "health",
            "trainable_params", "total_params", "tokens", "seconds"}


@pytest.mark.slow
def test_smoke_study_runs_every_strategy_and_reuses_finished_stages(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("EXPANDLM_DATA", str(shared_data))
    out = tmp_path / "study"
    assert main(["compare", str(REPO / "configs" / "smoke.yaml"), "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    assert {m["strategy"] for m in models} == {"base", "scratch", "full_ft", "lora", "joint", "replay", "ewc",
                                               "expand", "expand_paths", "expand_branch"}
    for m in models:
        assert REQUIRED <= set(m), m["label"]
        assert set(m["bpb"]) == {"stories", "recipes"} and all(v > 0 for v in m["bpb"].values())
        assert set(m["validity_ceiling"]) == {"recipes"} and 0 <= m["validity_ceiling"]["recipes"] <= 1
    by_label = {m["label"]: m for m in models}
    assert by_label["expand_paths"]["forgetting"] == 0.0  # the old path is untouched, exactly
    assert by_label["lora"]["forgetting"] == 0.0           # adapter off = the base
    assert by_label["expand_branch"]["forgetting"] == 0.0  # the old domain runs on the old model
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
    domains = "old_domain: stories\nnew_domain: recipes\n"
    bad.write_text(domains + "strategies:\n  - {name: full_ft, epochs: 3}\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown key 'strategies.0.epochs'$"):
        load_config(bad)
    bad.write_text(domains + "base_tokenz: 5\n")
    with pytest.raises(UserError, match=r"unknown key 'base_tokenz' \(known keys: old_domain"):
        load_config(bad)
    bad.write_text("preset: tiny\n")
    with pytest.raises(UserError, match="'old_domain' is required; 'new_domain' is required"):
        load_config(bad)
    bad.write_text("old_domain: stories\nnew_domain: poems\n")
    with pytest.raises(UserError, match="unknown domain 'poems'"):
        load_config(bad)
    bad.write_text("preset: [tiny\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    bad.write_text(domains + "strategies:\n  - {name: expand}\n  - {name: expand}\n")
    with pytest.raises(UserError, match="share a label"):
        load_config(bad)
    bad.write_text(domains + "train: {batch: 3}\n")
    with pytest.raises(UserError, match="bad.yaml: unknown key 'train.batch'"):
        load_config(bad)


def test_shipped_configs_load():
    for name in ("smoke", "stories-recipes", "gpu"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert {s.name for s in cfg.strategies} == {"full_ft", "lora", "joint", "replay", "ewc", "expand",
                                                    "expand_paths", "expand_branch"}
    assert {s.key for s in load_config(REPO / "configs" / "expansion.yaml").strategies} == {
        "expand_branch", "expand_branch_0", "expand_paths", "replay", "full_ft"}
    assert [s.key for s in load_config(REPO / "configs" / "expansion-1M.yaml").strategies] == ["expand_branch"]
