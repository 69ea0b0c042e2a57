"""The combination study (expandlm.studies.combine): every row, its columns, reuse of finished stages, config errors."""

import pytest
import yaml

from expandlm.studies import load_study
from expandlm.errors import UserError
from tests.conftest import run_study


@pytest.mark.slow
def test_smoke_combination_study_measures_every_way_of_combining(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setenv("EXPANDLM_DATA", str(shared_data))
    out = tmp_path / "combine"
    results = run_study("combine-smoke", out)
    rows = {r["label"]: r for r in results["models"]}
    domains = ["stories", "recipes", "code"]
    assert results["domains"] == domains
    for label in ("uniform", "ties", "fisher", "regmean", "lora_ties", "arrow_top1", "oracle routing (full experts)",
                  "per-request router (full experts)", "distilled student (continued from the base)",
                  "joint training (continued from the base, real data)", "regmean (mixed base)"):
        assert set(rows[label]["bpb"]) == set(domains), label
        assert all(v > 0 for v in rows[label]["bpb"].values())
    # the gaps are against each domain's expert: the oracle is each expert on its own domain, exactly
    assert rows["oracle routing (full experts)"]["gap"] == {d: 0.0 for d in domains}
    assert rows["stories expert (the base)"]["gap"]["stories"] == 0.0
    assert 0 <= rows["per-request router (full experts)"]["routing_accuracy"] <= 1
    # a merge stores one model; routing keeps them all; arrow keeps the base and both adapters
    base_params = rows["stories expert (the base)"]["stored_params"]
    assert rows["ties"]["stored_params"] == base_params and rows["ties"]["trained_params"] == 0
    assert rows["oracle routing (full experts)"]["stored_params"] == 3 * base_params
    adapters = rows["recipes LoRA"]["trained_params"] + rows["code LoRA"]["trained_params"]
    assert rows["arrow_top1"]["stored_params"] == base_params + adapters
    assert set(rows["uniform"]["domain_accuracy"]) == set(domains)  # a merged model is asked for every domain
    for name in ("report.md", "combine.png", "samples.json"):
        assert (out / name).exists()
    assert "| ties | merge (full) |" in (out / "report.md").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("run.json")}
    capsys.readouterr()
    run_study("combine-smoke", out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("run.json")} == stamps  # nothing retrained or re-merged


def test_combination_config_errors_name_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    base = {"study": "combine", "base_domain": "stories", "experts": ["recipes", "code"]}
    cases = [({**base, "experts": ["stories"]}, "experts"),
             ({**base, "merges": [{"label": "a", "method": "slerp"}]}, "merges.0.method"),
             ({**base, "merges": [{"label": "a", "method": "ties", "parameters": {"densty": 0.5}}]}, "densty"),
             ({**base, "merges": [{"label": "a", "method": "arrow"}]}, "of: lora"),
             ({**base, "merges": [{"label": "a", "method": "ties"}, {"label": "a", "method": "fisher"}]}, "share a label"),
             ({**base, "expert_tokens": "many"}, "expert_tokens")]
    for data, message in cases:
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(UserError, match=message):
            load_study(path)
