import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from expandlm.cli import main
from expandlm.formats.served import load_served


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_end_to_end(capsys, tmp_path, stories_file):
    tok_dir, model_dir = tmp_path / "tok", tmp_path / "model"
    code, out, _ = run(capsys, "tokenizer", "--domain", "stories", "--data", str(stories_file),
                       "--vocab-size", "300", "--out", str(tok_dir))
    assert code == 0 and "bytes/token" in out and (tok_dir / "tokenizer.json").exists()

    code, out, err = run(capsys, "train", "--domain", "stories", "--data", str(stories_file), "--tokenizer",
                         str(tok_dir), "--preset", "nano", "--max-steps", "12", "--batch-size", "4",
                         "--eval-interval", "6", "--no-progress", "--out", str(model_dir))
    assert code == 0, err
    from expandlm.training.loop import PRECISION_NAMES, TrainConfig, resolved_precision
    precision = resolved_precision(TrainConfig())  # auto: bf16 autocast where this CPU's bf16 matmuls are faster
    assert "parameters" in out and "val bpb" in out and f"training: 1 process on cpu, {PRECISION_NAMES[precision]}" in out
    details = json.loads((model_dir / "run.json").read_text())
    assert (details["world_size"], details["device"], details["precision"]) == (1, "cpu", precision)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # a standard checkpoint
    assert len(AutoTokenizer.from_pretrained(model_dir)) == model.config.vocab_size
    record = json.loads((model_dir / "run.json").read_text())
    assert record["status"] == "done" and record["seed"] == 0 and record["versions"]["torch"]
    assert record["spec"]["train"]["max_steps"] == 12 and record["steps"] == 12

    code, out, err = run(capsys, "eval", "--model", str(model_dir), "--domain", "stories", "--data",
                         str(stories_file))
    result = json.loads(out)
    assert code == 0 and result["bpb"] > 0 and result["documents"] == 60
    assert json.loads((model_dir / "eval-stories-stories.json").read_text())["bpb"] == result["bpb"]
    (model_dir / "eval-stories.json").write_text('{"model": "m", "domain": "stories", "bpb": 1.0}')
    (model_dir / "eval-stories-recipes.json").write_text("the user's own notes")
    other = tmp_path / "recipes.jsonl"
    other.write_text(stories_file.read_text())
    code, _, err = run(capsys, "eval", "--model", str(model_dir), "--domain", "stories", "--data", str(other))
    assert code == 2 and "eval-stories-recipes.json: exists and is not an expandlm eval result" in err
    assert (model_dir / "eval-stories-recipes.json").read_text() == "the user's own notes"
    assert json.loads((model_dir / "eval-stories.json").read_text())["bpb"] == 1.0  # another file's never replaces it

    code, out, _ = run(capsys, "generate", "--model", str(model_dir), "--domain", "stories", "--prompt", "Lily",
                       "--num-samples", "2", "--max-new-tokens", "10", "--json")
    samples = json.loads(out)["samples"]
    assert code == 0 and len(samples) == 2 and all(s["text"].startswith("Lily") for s in samples)
    code, out, _ = run(capsys, "generate", "--model", str(model_dir), "--domain", "stories", "--prompt", "Lily",
                       "--max-new-tokens", "10")
    assert code == 0 and out.startswith("Lily")

    # a second run into the same folder is refused rather than overwriting it
    code, _, err = run(capsys, "train", "--domain", "stories", "--data", str(stories_file), "--out", str(model_dir))
    assert code == 2 and "already holds a run" in err


def test_adapt_then_generate_on_request(capsys, tmp_path, stories_file, recipes_file):
    base, both = tmp_path / "base", tmp_path / "both"
    common = ["--preset", "nano", "--max-steps", "6", "--batch-size", "4", "--eval-interval", "0", "--no-progress"]
    assert run(capsys, "train", "--domain", "stories", "--data", str(stories_file), "--out", str(base), *common)[0] == 0
    code, out, err = run(capsys, "adapt", "--base", str(base), "--method", "expand_paths", "--option",
                         "new_blocks=1", "--domain", "recipes", "--data", str(recipes_file), "--out", str(both),
                         *common[2:])
    assert code == 0, err
    assert json.loads((both / "expandlm.json").read_text())["domains"] == ["stories", "recipes"]
    for request, domain, prompt in [("write a recipe for banana bread", "recipes", "Banana Bread"),
                                    ("tell me a story about a brave little cat", "stories", "Once upon a time")]:
        code, out, err = run(capsys, "generate", "--model", str(both), "--request", request, "--max-new-tokens", "5",
                             "--json")
        result = json.loads(out)
        assert code == 0 and result["domain"] == domain and result["routing"]["domain"] == domain
        assert result["samples"][0]["text"].startswith(prompt)
        assert f"routed to {domain}" in err
    assert not (both / "router.joblib").exists()  # routing reads a model folder, never writes into it
    code, _, err = run(capsys, "adapt", "--base", str(base), "--strategy", "expand", "--option", "blocks=2",
                       "--domain", "recipes", "--data", str(recipes_file), "--out", str(tmp_path / "x"))
    assert code == 2 and "method 'expand' options: unknown key 'blocks'" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--domain", "poems", "--data", "x.jsonl", "--out", "o"], "unknown domain 'poems'"),
    (["train", "--domain", "stories", "--data", "missing.jsonl", "--out", "o"], "missing.jsonl: no such file"),
    (["train", "--resume", "--out", "nowhere"], "nothing to resume"),
    (["generate", "--model", "nowhere", "--domain", "stories"], "nowhere: no such model folder"),
    (["generate", "--model", "nowhere", "--domain", "stories", "--request", "a story"], "not both"),
    (["adapt", "--out", "o"], "adapt needs --base"),
    (["compare", "missing.yaml", "--out", "o"], "missing.yaml: no such config file"),
    (["train", "--domain", "storys", "--data", "x.jsonl", "--out", "o"], "unknown domain 'storys'; did you mean 'stories'?"),
    (["adapt", "--base", "b", "--strategy", "lroa", "--domain", "recipes", "--data", "x", "--out", "o"],
     "unknown method 'lroa'; did you mean 'lora'?"),
    (["train", "--domain", "stories", "--data", "x.jsonl", "--out", "o", "--preset", "tinny"],
     "unknown preset 'tinny'; did you mean 'tiny'?"),
])
def test_user_errors_are_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("expandlm: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_line_in_corpus_is_reported(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "oops"\n')
    code, _, err = run(capsys, "train", "--domain", "stories", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{bad}:2: invalid JSON" in err
    assert not (tmp_path / "o" / "run.json").exists()


def _users_folder(path):
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("precious")
    (path / "metrics.jsonl").write_text("my own numbers\n")
    return {p.name: p.read_text() for p in path.iterdir()}


def test_a_users_folder_is_never_emptied_or_overwritten(capsys, tmp_path, stories_file, shared_data):
    """Issue 30's repros: `demo --out D` emptied D/stories; `train --out` replaced the user's metrics.jsonl;
    `--out` a file gave a traceback. Each is refused in one line and every file stays as it was."""
    demo, earlier, own, file = tmp_path / "D", tmp_path / "E", tmp_path / "mine", tmp_path / "notes.txt"
    kept = {demo / "stories": _users_folder(demo / "stories"), earlier / "stories": _users_folder(earlier / "stories"),
            own: _users_folder(own)}
    (earlier / ".expandlm").touch()  # an earlier demo's folder, whose stage folder the user replaced
    file.write_text("mine")
    demo_argv = ["demo", "--preset", "nano", "--limit", "100", "--data-dir", str(shared_data), "--out"]
    for argv, where in [
        ([*demo_argv, str(demo)], demo),
        ([*demo_argv, str(earlier)], earlier / "stories"),
        (["train", "--domain", "stories", "--data", str(stories_file), "--out", str(own), *NANO], own),
        (["tokenizer", "--domain", "stories", "--data", str(stories_file), "--vocab-size", "300", "--limit", "50",
          "--out", str(own)], own),
        (["train", "--domain", "stories", "--data", str(stories_file), "--out", str(file), *NANO], file),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith(f"expandlm: error: {where}: ") and len(err.strip().splitlines()) == 1, err
    for folder, files in kept.items():
        assert {p.name: p.read_text() for p in folder.iterdir()} == files
    assert file.read_text() == "mine"


@pytest.mark.slow
def test_demo_grows_one_model_that_answers_each_domain(capsys, tmp_path, shared_data):
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--preset", "nano", "--minutes", "0.1", "--limit", "300", "--samples", "4",
            "--data-dir", str(shared_data), "--no-progress"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert [(r["stage"], r["method"]) for r in results["stages"]] == [("stories", "scratch"),
                                                                         ("+recipes", "expand_branch")]
    by_domain = {r["domain"]: r for r in results["domains"]}
    assert by_domain["stories"]["same as its expert"] is True  # the old domain is bit for bit the expert
    assert 0 <= by_domain["recipes"]["valid"] <= 1 and 0 < by_domain["recipes"]["valid ceiling"] <= 1
    assert by_domain["stories"]["valid"] is None and all(r["bpb"] > 0 for r in by_domain.values())
    assert [a["domain"] for a in results["answers"]] == ["stories", "recipes"]  # each request routed to its domain
    assert all(len(results["samples"][d]) == 4 for d in ("stories", "recipes"))
    served = load_served(out / "+recipes")
    assert served.domains == ["stories", "recipes"]
    report = (out / "report.md").read_text()
    assert "| stories |" in report and "## recipes, sample 3" in report and (out / "learning_curves.png").exists()
    assert all(r["documents"] > 0 for r in results["domains"])  # the table's bpb reads them all, the curve fewer
    assert "the curves' periodic passes read the first 200" in report
    assert "Write a recipe for banana bread" in stdout
    from expandlm.run_folder import RunFolder
    from expandlm.studies.demo import DemoConfig, too_few_tokens
    records = [RunFolder(out / s).record() for s in ("stories", "+recipes")]
    assert all(r.details["cpu_share"] > 0 and r.details["cpu_threads"] >= 1 for r in records)
    warnings = [w for s, r in zip(("stories", "+recipes"), records) if (w := too_few_tokens(s, r, DemoConfig(
        train=records[0].spec["train"])))]
    assert results["warnings"] == warnings and ("**Warning:**" in report) == bool(warnings)
    assert not warnings or stdout.strip().splitlines()[-1] == f"warning: {warnings[-1]}"  # the run's last line
    # a second run reuses the finished stages
    code, stdout, _ = run(capsys, *argv)
    assert code == 0 and stdout.count("reusing the finished run") == 2


NANO = ["--preset", "nano", "--max-steps", "4", "--batch-size", "4", "--eval-interval", "0", "--no-progress"]


def test_a_config_file_sets_every_option_and_flags_win(capsys, tmp_path, stories_file):
    config = tmp_path / "run.yaml"
    config.write_text(f"domain: stories\ndata: {stories_file}\npreset: nano\nvocab_size: 300\n"
                      "train: {max_steps: 3, batch_size: 2, lr: 0.001, eval_interval: 0, progress: false}\n")
    code, _, err = run(capsys, "train", "--config", str(config), "--batch-size", "3", "--out", str(tmp_path / "m"))
    assert code == 0, err
    spec = json.loads((tmp_path / "m" / "run.json").read_text())["spec"]
    assert (spec["train"]["max_steps"], spec["train"]["batch_size"], spec["train"]["lr"]) == (3, 3, 0.001)
    assert spec["vocab_size"] == 300 and spec["data"] == "../stories.jsonl"  # relative to the run folder
    config.write_text("domain: stories\ndata: x.jsonl\ntrain: {max_tokens: 2e6}\n")
    code, _, err = run(capsys, "train", "--config", str(config), "--out", str(tmp_path / "n"))
    assert code == 2 and f"{config}: 'train.max_tokens': input should be a valid integer" in err


def test_list_and_bool_options_from_the_command_line(capsys, tmp_path, stories_file, recipes_file):
    base = tmp_path / "base"
    assert run(capsys, "train", "--domain", "stories", "--data", str(stories_file), "--out", str(base), *NANO)[0] == 0
    code, _, err = run(capsys, "adapt", "--base", str(base), "--method", "lora", "--option", "r=2",
                       "--option", "target_modules=q_proj,v_proj", "--domain", "recipes", "--data",
                       str(recipes_file), "--out", str(tmp_path / "lora"), *NANO[2:])
    assert code == 0, err
    adapter = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["r"] == 2
    code, _, err = run(capsys, "adapt", "--base", str(base), "--method", "joint", "--option", "from_scratch=maybe",
                       "--domain", "recipes", "--data", str(recipes_file), "--out", str(tmp_path / "j"), *NANO[2:])
    assert code == 2 and "'from_scratch': input should be a valid boolean" in err


def test_models_work_from_another_directory(capsys, tmp_path, monkeypatch, stories_file, recipes_file):
    """Paths given relative to one working directory keep working from any other."""
    work = tmp_path / "work"
    work.mkdir()
    for f in (stories_file, recipes_file):
        (work / f.name).write_bytes(f.read_bytes())
    monkeypatch.chdir(work)
    assert run(capsys, "train", "--domain", "stories", "--data", "stories.jsonl", "--out", "runs/base", *NANO)[0] == 0
    code, _, err = run(capsys, "adapt", "--base", "runs/base", "--method", "full_ft", "--domain", "recipes",
                       "--data", recipes_file.name, "--out", "runs/both", *NANO[2:])
    assert code == 0, err
    monkeypatch.chdir(tmp_path)  # elsewhere: the router trains from the recorded corpora, adapt reads them
    code, out, err = run(capsys, "generate", "--model", "work/runs/both", "--request", "a recipe for soup",
                         "--max-new-tokens", "4", "--json")
    assert code == 0 and json.loads(out)["domain"] == "recipes", err
    code, _, err = run(capsys, "adapt", "--base", "work/runs/base", "--strategy", "replay", "--domain", "recipes",
                       "--data", "work/recipes.jsonl.gz", "--out", "again", *NANO[2:])  # replays the recorded stories
    assert code == 0, err
    monkeypatch.chdir(tmp_path / "work" / "runs")
    code, _, err = run(capsys, "train", "--resume", "--out", "base")
    assert code == 2 and "nothing to resume" in err


def test_a_users_own_domain_from_a_spec_file(capsys, tmp_path, monkeypatch, stories_file, user_domains):
    """The README's example: declare a domain in YAML beside its corpus, add it to a stories model,
    generate it by name from anywhere (the model folder keeps the spec)."""
    from expandlm.domains import DOMAINS

    (tmp_path / "mine").mkdir()
    write = (tmp_path / "mine" / "poems.jsonl").open("w")
    for i in range(40):
        write.write(json.dumps({"title": f"Poem {i}", "lines": ["the rain falls soft", f"on roof number {i}"]}) + "\n")
    write.close()
    (tmp_path / "mine" / "poems.yaml").write_text(
        "name: poems\ndata: {train: poems.jsonl}\n"
        "text: {template: \"{title}\\n\\n{lines:lines}\", fields: {title: str, lines: list}}\n"
        "request: {nouns: [poem], prompt: \"{topic:title}\"}\n")
    assert run(capsys, "train", "--domain", "stories", "--data", str(stories_file), "--out", str(tmp_path / "base"),
               *NANO)[0] == 0
    code, out, err = run(capsys, "adapt", "--base", str(tmp_path / "base"), "--domain", str(tmp_path / "mine" / "poems.yaml"),
                         "--out", str(tmp_path / "both"), *NANO[2:])  # no --data: the spec names the file
    assert code == 0, err
    card = json.loads((tmp_path / "both" / "expandlm.json").read_text())
    assert card["domains"] == ["stories", "poems"] and card["method"] == "expand_branch" and card["format"] == "branch"
    record = json.loads((tmp_path / "both" / "run.json").read_text())
    assert record["domain_data"]["poems"]["limit"] is None and record["bpb"]["poems"] > 0
    del DOMAINS["poems"]  # as in a new process: only the folder knows the domain now
    monkeypatch.chdir(tmp_path / "mine")
    code, out, err = run(capsys, "generate", "--model", str(tmp_path / "both"), "--domain", "poems", "--prompt",
                         "Rain", "--max-new-tokens", "5", "--json")
    assert code == 0, err
    assert json.loads(out)["samples"][0]["text"].startswith("Rain")


def test_serve_takes_its_api_keys_from_the_flags_or_the_environment(capsys, monkeypatch):
    import expandlm.serve.app as app

    given = []
    monkeypatch.setattr(app, "serve", lambda models, **kw: given.append(kw["api_keys"]))
    monkeypatch.delenv("EXPANDLM_API_KEY", raising=False)
    assert run(capsys, "serve", "m")[0] == 0
    monkeypatch.setenv("EXPANDLM_API_KEY", "from-env")
    assert run(capsys, "serve", "m")[0] == 0
    assert run(capsys, "serve", "m", "--api-key", "a", "--api-key", "b")[0] == 0  # flags win over the environment
    assert given == [(), ("from-env",), ("a", "b")]
    code, _, err = run(capsys, "serve", "m", "--api-key", " ")
    assert code == 2 and "empty key" in err and len(given) == 3


def test_the_command_list_and_a_misspelt_command_need_no_torch():
    """`expandlm --help` and a misspelt command answer before any stage (torch, transformers, peft) is imported."""
    import subprocess
    import sys
    probe = ("import sys\nfrom expandlm.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
             "except SystemExit as e:\n    code = e.code\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules)\n"
             "print('imported:', heavy)\nsys.exit(code)")
    for argv, code, says in [(["--help"], 0, "serve"), (["trian"], 2, "did you mean 'train'?")]:
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True)
        assert done.returncode == code and says in done.stdout + done.stderr and "imported: []" in done.stdout, done


def test_every_command_builds_its_flags():
    import argparse
    from expandlm.cli import _COMMANDS, build_parser
    every = build_parser()
    commands = next(a for a in every._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert list(commands) == list(_COMMANDS)
    assert all(len(p._actions) > 1 and p.get_default("func") for p in commands.values())  # more than -h
    only = next(a for a in build_parser(only="eval")._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(only["eval"]._actions) > 1 and len(only["train"]._actions) == 1
