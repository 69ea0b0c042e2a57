import json
import shutil

import pytest
import yaml

from expandlm.studies import load_study
from expandlm.studies.combine import CombineStudy
from expandlm.studies.compare import Study
from expandlm.errors import UserError
from expandlm.adapt import DEFAULT_METHOD
from tests.conftest import REPO, run_study


def expansion_config(path):
    """The config of an expansion study, read as `expandlm compare` reads it."""
    cfg, study = load_study(path)
    assert study is Study
    return cfg


REQUIRED = {"strategy", "bpb", "forgetting", "new_domain_gap", "domain_accuracy", "validity", "validity_ceiling", "health",
            "trainable_params", "total_params", "tokens", "seconds"}


@pytest.mark.slow
def test_smoke_study_runs_every_strategy_and_reuses_finished_stages(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setenv("EXPANDLM_DATA", str(shared_data))
    out = tmp_path / "study"
    results = run_study("smoke", out)
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
    run_study("smoke", out)
    assert {p: p.stat().st_mtime_ns for p in out.glob("seed0/*/run.json")} == stamps
    assert "expert (" not in capsys.readouterr().out

    # a stage lost mid-way is redone, the rest kept
    shutil.rmtree(out / "seed0" / "replay")
    (out / "seed0" / "full_ft" / "suite.json").unlink()
    run_study("smoke", out)
    assert (out / "seed0" / "replay" / "run.json").exists() and (out / "seed0" / "full_ft" / "suite.json").exists()


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    domains = "study: expansion\nold_domain: stories\nnew_domain: recipes\n"
    bad.write_text(domains + "strategies:\n  - {name: full_ft, epochs: 3}\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown key 'strategies.0.epochs'$"):
        expansion_config(bad)
    bad.write_text(domains + "base_tokenz: 5\n")
    with pytest.raises(UserError, match=r"unknown key 'base_tokenz' \(known keys: old_domain"):
        expansion_config(bad)
    bad.write_text("study: expansion\npreset: tiny\n")
    with pytest.raises(UserError, match="'old_domain' is required; 'new_domain' is required"):
        expansion_config(bad)
    bad.write_text("study: expansion\nold_domain: stories\nnew_domain: poems\n")
    with pytest.raises(UserError, match="unknown domain 'poems'"):
        expansion_config(bad)
    bad.write_text("preset: [tiny\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: invalid YAML"):
        expansion_config(bad)
    bad.write_text(domains + "strategies:\n  - {name: expand}\n  - {name: expand}\n")
    with pytest.raises(UserError, match="two runs labelled 'expand' share seed 0 and 1,000,000 tokens"):
        expansion_config(bad)
    bad.write_text(domains + "seeds: [0, 1]\nstrategies:\n  - {name: expand, seeds: [0]}\n"
                   "  - {name: expand, seeds: [1], options: {new_blocks: 3}}\n")
    with pytest.raises(UserError, match="runs labelled 'expand' differ in strategy or settings"):
        expansion_config(bad)
    bad.write_text(domains + "seeds: [0, 1]\nstrategies:\n  - {name: expand, seeds: [0]}\n  - {name: expand, seeds: [1]}\n")
    assert len(expansion_config(bad).strategies) == 2  # one curve, its points split over two entries
    bad.write_text(domains + "train: {batch: 3}\n")
    with pytest.raises(UserError, match="bad.yaml: unknown key 'train.batch'"):
        expansion_config(bad)


def test_shipped_configs_load():
    for name in ("smoke", "stories-recipes", "gpu"):
        cfg = expansion_config(REPO / "configs" / f"{name}.yaml")
        assert {s.name for s in cfg.strategies} == {"full_ft", "lora", "joint", "replay", "ewc", "expand",
                                                    "expand_paths", "expand_branch"}
    ablations = expansion_config(REPO / "configs" / "expansion.yaml")
    assert {s.name for s in ablations.strategies} == {"expand_branch", "expand_paths", "replay", "full_ft"}
    assert len(ablations.strategies) > 10 and ablations.budgets == [500_000]
    curve = expansion_config(REPO / "configs" / "expansion-curve.yaml")
    assert curve.budgets == [500_000, 1_000_000, 2_000_000, 4_000_000]
    points = [(seed, t) for seed in curve.seeds for t in curve.budgets if curve.runs_at(seed, t)]
    assert all(t in [p[1] for p in points if p[0] == 0] for t in curve.budgets)  # every budget at seed 0
    assert all(curve.runs_at(seed, t)[0].name == DEFAULT_METHOD for seed, t in points)  # the default at each
    reverse = expansion_config(REPO / "configs" / "expansion-reverse.yaml")
    assert (reverse.old_domain, reverse.new_domain) == ("recipes", "stories")
    assert [s.key for s in expansion_config(REPO / "configs" / "expansion-1M.yaml").strategies] == ["expand_branch"]


def test_every_shipped_config_declares_its_study_type():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        declared = yaml.safe_load(path.read_text())["study"]
        _, study = load_study(path)
        assert study is {"expansion": Study, "combine": CombineStudy}[declared], path.name


def test_a_config_without_study_is_read_as_the_type_its_keys_imply_and_says_so(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("old_domain: stories\nnew_domain: recipes\ngrow: [code]\nadapt_tokens: 1000\n")
    cfg, study = load_study(old)
    assert study is Study and cfg.grow == ["code"]
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "'study' key" in said[0] and "declare it with 'study: expansion'" in said[0]
    old.write_text("base_domain: stories\nexperts: [recipes]\n")
    cfg, study = load_study(old)
    assert study is CombineStudy and cfg.experts == ["recipes"]
    assert "declare it with 'study: combine'" in capsys.readouterr().out
    old.write_text("study: combine\nbase_domain: stories\nexperts: [recipes]\n")
    load_study(old)
    assert capsys.readouterr().out == ""  # a declared type is not announced


def test_a_study_type_that_contradicts_the_keys_names_the_file_and_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, error in (
            ("study: combine\nold_domain: stories\nnew_domain: recipes\n",
             r"bad.yaml: 'study' is combine, but 'old_domain', 'new_domain' are keys of 'study: expansion'"),
            ("study: expansion\nold_domain: stories\nnew_domain: recipes\nmerges: []\n",
             r"bad.yaml: 'study' is expansion, but 'merges' is a key of 'study: combine'"),
            ("study: growth\nold_domain: stories\nnew_domain: recipes\n",
             r"bad.yaml: 'study': unknown study type 'growth' \(known: expansion, combine\)"),
            ("old_domain: stories\nexperts: [recipes]\n",
             r"bad.yaml: 'study' is missing and the keys do not tell which study this is \('old_domain' of 'expansion'; "
             r"'experts' of 'combine'\)"),
            ("preset: nano\n", r"bad.yaml: 'study' is missing .*; add study: expansion or study: combine$")):
        bad.write_text(text)
        with pytest.raises(UserError, match=error):
            load_study(bad)


@pytest.mark.slow
def test_a_learning_curve_study_runs_each_strategy_at_its_budgets_and_seeds(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("EXPANDLM_DATA", str(shared_data))
    config = tmp_path / "curve.yaml"
    config.write_text(
        "study: expansion\npreset: nano\nseeds: [0, 1]\nold_domain: stories\nnew_domain: recipes\nlimit: 200\nval_limit: 20\n"
        "base_tokens: 8000\nadapt_tokens: [4000, 8000]\ntrain: {batch_size: 8, eval_interval: 0, eval_docs: 10}\n"
        "strategies:\n"
        "  - {name: expand_branch, options: {new_blocks: 1}, train: {lr: 0.004}}\n"
        "  - {name: full_ft, seeds: [0], adapt_tokens: [8000]}\n"
        "evaluation: {samples: 2, max_new_tokens: 16, classifier_docs: 50}\n")
    out = tmp_path / "curve"
    rows = run_study(config, out)["models"]
    points = sorted((r["label"], r["seed"], r["adapt_tokens"]) for r in rows if r["strategy"] != "base")
    assert points == sorted([("expand_branch", s, t) for s in (0, 1) for t in (4000, 8000)]
                            + [("full_ft", 0, 8000)]
                            + [("recipes expert (reference)", s, t) for s in (0, 1) for t in (4000, 8000)])
    for r in rows:  # each run measured against the scratch expert of its own seed and budget
        if r["strategy"] not in ("base", "scratch"):
            assert r["model"] == f"seed{r['seed']}/{r['adapt_tokens'] / 1e6:g}M/{r['label']}"
            assert r["tokens"] >= r["adapt_tokens"]
    spec = json.loads((out / "seed1" / "0.004M" / "expand_branch" / "run.json").read_text())["spec"]
    assert spec["train"]["lr"] == 0.004 and spec["train"]["max_tokens"] == 4000
    assert not (out / "seed1" / "0.008M" / "full_ft").exists()
    report = (out / "report.md").read_text()
    assert "## The new-domain gap against tokens" in report and (out / "new_domain_gap.png").exists()
    assert "| expand_branch |" in report and "2 seeds)" in report


def test_per_run_seeds_and_budgets_must_be_the_studys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: expansion\nold_domain: stories\nnew_domain: recipes\nseeds: [0]\nadapt_tokens: [1000, 2000]\n"
                   "strategies:\n  - {name: full_ft, adapt_tokens: [3000]}\n")
    with pytest.raises(UserError, match=r"bad.yaml: strategy 'full_ft': 'adapt_tokens' has \[3000\], not among"):
        expansion_config(bad)
    bad.write_text("study: expansion\nold_domain: stories\nnew_domain: recipes\nstrategies:\n  - {name: full_ft, train: {lr: -1}}\n")
    with pytest.raises(UserError, match=r"bad.yaml: strategy 'full_ft': train: 'lr'"):
        expansion_config(bad)


@pytest.mark.slow
def test_a_growth_study_adds_the_domains_one_at_a_time_per_strategy(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("EXPANDLM_DATA", str(shared_data))
    out = tmp_path / "grow"
    rows = run_study("grow-smoke", out)["models"]
    runs = [(r["label"], r["step"], r["added"]) for r in rows if r["step"]]
    assert runs == [(s, step, d) for s in ("expand_branch", "replay", "joint", "full_ft")
                    for step, d in ((1, "recipes"), (2, "code"))]
    reference = {r["added"]: r["bpb"][r["added"]] for r in rows if r["strategy"] in ("base", "scratch")}
    assert set(reference) == {"stories", "recipes", "code"}
    by = {(r["label"], r["step"]): r for r in rows}
    for label, step in by:
        r = by[label, step]
        served = ["stories", "recipes", "code"][:step + 1] if step is not None else [r["added"]]
        assert set(r["bpb"]) == set(served) and set(r["gap"]) == set(served)
        assert set(r["validity_ceiling"]) == {d for d in served if d != "stories"}  # recipes and code have a check
        assert set(r["validity"]) == set(r["validity_ceiling"])
    first, second = by["expand_branch", 1], by["expand_branch", 2]
    assert second["forgetting"] == {"stories": 0.0, "recipes": 0.0} and first["forgetting"] == {"stories": 0.0}
    assert second["bpb"]["recipes"] == first["bpb"]["recipes"]
    replay = by["replay", 2]
    assert replay["forgetting"]["recipes"] == replay["bpb"]["recipes"] - by["replay", 1]["bpb"]["recipes"]
    assert replay["gap"]["code"] == pytest.approx(replay["bpb"]["code"] / reference["code"] - 1)
    assert (out / "growth.png").exists() and "| expand_branch | 0 | 2: +code |" in (out / "report.md").read_text()


def test_growth_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    domains = "study: expansion\nold_domain: stories\nnew_domain: recipes\n"
    for text, error in (("grow: []\n", "'grow' lists no domain"),
                        ("grow: [recipes]\n", "'grow' must name each domain once"),
                        ("grow: [poems]\n", "unknown domain 'poems'"),
                        ("grow: [code]\nadapt_tokens: [1000, 2000]\n", "'adapt_tokens' must be one budget"),
                        ("grow: [code]\nstrategies:\n  - {name: lora}\n", "strategies: 'lora': a lora model cannot be "
                                                                          "adapted again")):
        bad.write_text(domains + text)
        with pytest.raises(UserError, match=error):
            expansion_config(bad)
    grow = expansion_config(REPO / "configs" / "grow.yaml")
    assert grow.domains == ["stories", "recipes", "code"] and grow.preset == "tiny" and grow.budgets == [500_000]
    assert [s.key for s in grow.strategies] == ["expand_branch", "replay", "joint", "full_ft"]
    assert expansion_config(REPO / "configs" / "grow-smoke.yaml").preset == "nano"


@pytest.mark.slow
@pytest.mark.usefixtures("user_domains")
def test_a_study_of_user_written_domains_runs_end_to_end(tmp_path):
    """Neither domain is built in: each model's tokenizer lacks the other domain's tag."""
    from tests.conftest import RECIPES, STORIES, write_jsonl

    write_jsonl(tmp_path / "tales.jsonl", [{"text": t} for t in STORIES])
    write_jsonl(tmp_path / "dishes.jsonl", [{"text": f"{r['title']}: {', '.join(r['ingredients'])}."} for r in RECIPES])
    (tmp_path / "tales.yaml").write_text("name: tales\ndata: {train: tales.jsonl}\nrequest: {nouns: [tale]}\n")
    (tmp_path / "dishes.yaml").write_text("name: dishes\ndata: {train: dishes.jsonl}\ncheck: {pattern: '[^:]+: .+'}\n"
                                          "request: {nouns: [dish]}\n")
    config = tmp_path / "user.yaml"
    config.write_text(
        "study: expansion\npreset: nano\nold_domain: tales.yaml\nnew_domain: dishes.yaml\nbase_tokens: 4000\nadapt_tokens: 2000\n"
        "train: {batch_size: 4, eval_interval: 0, eval_docs: 5}\nstrategies:\n  - {name: expand_branch}\n"
        "tokenizer_study: {tokenizers: [custom, shared, bytes], tokens: 1000}\n"
        "evaluation: {samples: 2, max_new_tokens: 8, classifier_docs: 20}\n")
    out = tmp_path / "study"
    rows = run_study(config, out)["models"]
    assert [r["strategy"] for r in rows] == ["base", "scratch", "expand_branch"]
    for r in rows:
        assert set(r["bpb"]) == {"tales", "dishes"} and all(v > 0 for v in r["bpb"].values()), r["label"]
        assert set(r["validity_ceiling"]) == {"dishes"}
    assert len(json.loads((out / "results.json").read_text())["tokenizer_study"]) == 6
