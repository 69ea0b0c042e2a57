"""adapt end to end: a killed run resumes exactly, and two processes write one folder."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from expandlm.errors import UserError
from expandlm.run_folder import MARK, RunFolder
from expandlm.formats.served import load_served

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
    record = RunFolder(tmp_path / "b").record().to_json()
    assert record["status"] == "done" and record["resumed_from"] == [killed_at] and record["steps"] == 150
    assert _curve(tmp_path / "b") == _curve(tmp_path / "a")
    assert record["bpb"] == RunFolder(tmp_path / "a").record().to_json()["bpb"]


@pytest.mark.slow
def test_adapt_under_two_processes_writes_one_folder(base, tmp_path):
    out = tmp_path / "ddp"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m")
    done = subprocess.run(_adapt_cmd(base, out, "--max-steps", "6", launcher=launcher), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    record = RunFolder(out).record().to_json()
    assert record["status"] == "done" and record["steps"] == 6
    assert record["tokens"] == 6 * 4 * 128 * 2  # both processes' samples
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [MARK]  # no temp leftovers
    served = load_served(out)
    ids = torch.tensor([[served.tokenizer.bos_token_id, served.tokenizer.convert_tokens_to_ids("<|stories|>"), 70]])
    base_model = load_served(base[0] / "base").model
    with torch.no_grad():
        assert torch.equal(served.for_domain("stories")(input_ids=ids).logits, base_model(input_ids=ids).logits)


# -- growing one model a domain at a time -------------------------------------------------------------

CODE = [{"text": "def add(a, b):\n    return a + b"}, {"text": "def greet(name):\n    print('hello', name)"},
        {"text": "def first(items):\n    for item in items:\n        return item\n    return None"}] * 20
FAST = dict(max_steps=4, batch_size=4, eval_interval=0, eval_docs=5, progress=False, log_interval=2)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """stories expert → +recipes → +code, with expand_branch and with replay (nano, a few steps each)."""
    from expandlm.adapt.run import AdaptSpec, adapt
    from expandlm.training.expert import ExpertSpec, train_expert
    from expandlm.training.loop import TrainConfig
    from tests.conftest import RECIPES, STORIES, write_jsonl
    root = tmp_path_factory.mktemp("chain")
    data = {"stories": write_jsonl(root / "stories.jsonl", [{"text": t} for t in STORIES]),
            "recipes": write_jsonl(root / "recipes.jsonl", RECIPES), "code": write_jsonl(root / "code.jsonl", CODE)}
    cache = str(root / "cache")
    train_expert(ExpertSpec(domain="stories", data=str(data["stories"]), out=str(root / "stories"), preset="nano",
                            cache_dir=cache, vocab_size=400, train=TrainConfig(**FAST)))

    def grow(base, strategy, domain, out, **options):
        return adapt(AdaptSpec(base=str(root / base), method=strategy, domain=domain, data=str(data[domain]),
                               out=str(root / out), options=options, cache_dir=cache, train=TrainConfig(**FAST))).to_json()
    grow("stories", "expand_branch", "recipes", "branch1", new_blocks=1)
    grow("branch1", "expand_branch", "code", "branch2", new_blocks=1)
    grow("stories", "replay", "recipes", "replay1")
    grow("replay1", "replay", "code", "replay2")
    return root, grow


def _logits(model, tok, domain):
    ids = torch.tensor([[tok.bos_token_id, tok.convert_tokens_to_ids(f"<|{domain}|>"), 70, 80, 90, 100]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_branch_chain_keeps_every_old_domain_bit_identical_served_and_exported(chain, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from expandlm.cli import main
    from expandlm.domains import get_domain
    from expandlm.inference.generate import SamplingConfig, generate
    root, _ = chain
    first, second = load_served(root / "branch1"), load_served(root / "branch2")
    assert second.domains == ["stories", "recipes", "code"]
    assert isinstance(second.model.base.model, type(first.model))  # the base folder, loaded as what it is
    for domain in ("stories", "recipes"):
        tok = second.tokenizer_for(domain)
        assert tok.get_vocab() == first.tokenizer_for(domain).get_vocab()
        assert torch.equal(_logits(second.for_domain(domain), tok, domain), _logits(first.for_domain(domain), tok, domain))
        assert main(["export", str(root / "branch2"), "--domain", domain, "--out", str(tmp_path / domain)]) == 0
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / domain)
        assert AutoTokenizer.from_pretrained(tmp_path / domain).get_vocab() == tok.get_vocab()
        assert torch.equal(_logits(exported, tok, domain), _logits(first.for_domain(domain), tok, domain))
    stories = load_served(root / "stories")
    assert torch.equal(_logits(second.for_domain("stories"), stories.tokenizer, "stories"),
                       _logits(stories.model, stories.tokenizer, "stories"))
    code_tok = second.tokenizer_for("code")
    assert code_tok.get_vocab() != first.tokenizer_for("recipes").get_vocab()  # code has a tokenizer of its own
    assert second.for_domain("code").config.num_hidden_layers == stories.model.config.num_hidden_layers + 1  # trunk + 1
    greedy = SamplingConfig(temperature=0, max_new_tokens=8)
    for domain in second.domains:  # the served view (transformers) and the export (the decode engine) agree
        args = second.tokenizer_for(domain), get_domain(domain), "", 1, greedy
        assert (generate(second.for_domain(domain), *args, engine="hf")[0].text
                == generate(second.decode_model(domain), *args)[0].text)
        assert main(["generate", "--model", str(root / "branch2"), "--domain", domain, "--max-new-tokens", "8"]) == 0
    record = RunFolder(root / "branch2").record().to_json()
    assert record["forgetting"] == {"stories": 0.0, "recipes": 0.0}
    assert record["bpb_before"] == {d: RunFolder(root / "branch1").record().to_json()["bpb"][d] for d in ("stories", "recipes")}


def test_old_domains_data_resolves_two_folders_down_a_moved_chain(chain, tmp_path):
    import shutil
    root, _ = chain
    moved = tmp_path / "moved"
    shutil.copytree(root, moved, ignore=shutil.ignore_patterns("cache"))
    data = load_served(moved / "branch2").domain_data()
    assert set(data) == {"stories", "recipes", "code"}
    for domain, entry in data.items():
        assert entry.train == str((moved / f"{domain}.jsonl").resolve())


def test_a_whole_model_strategy_over_two_additions_records_forgetting_per_old_domain(chain):
    root, grow = chain
    first, second = RunFolder(root / "replay1").record().to_json(), RunFolder(root / "replay2").record().to_json()
    assert set(second["bpb"]) == {"stories", "recipes", "code"}
    assert set(second["forgetting"]) == {"stories", "recipes"}
    for d in ("stories", "recipes"):
        assert second["bpb_before"][d] == first["bpb"][d]
        assert second["forgetting"][d] == second["bpb"][d] - first["bpb"][d]
    assert load_served(root / "replay2").tokenizer_for("recipes") is not None
    ewc = grow("replay1", "ewc", "code", "ewc2", fisher_batches=2)  # its Fisher over both old domains
    assert set(ewc["forgetting"]) == {"stories", "recipes"}


def test_replay_and_joint_mix_every_old_domain():
    from expandlm.domains import get_domain
    from expandlm.adapt import AdaptContext, make_method
    ctx = AdaptContext(["stories", "recipes"], get_domain("code"), "code", {"stories": "s", "recipes": "r"},
                       None, None, 0, "nano")
    for strategy, options, weights in (("replay", {"fraction": 0.2}, [0.8, 0.1, 0.1]),
                                       ("joint", {"new_share": 0.5}, [0.5, 0.25, 0.25])):
        mixture = make_method(strategy, options).mixture(ctx)
        assert [s for s, _ in mixture] == ["code", "s", "r"]
        assert [w for _, w in mixture] == pytest.approx(weights)


@pytest.mark.parametrize("strategy", ["expand_paths", "lora"])
def test_expand_branch_grows_a_model_of_any_strategy_and_keeps_its_domains(chain, strategy):
    root, grow = chain
    grow("stories", strategy, "recipes", f"{strategy}1", new_blocks=1) if strategy == "expand_paths" else \
        grow("stories", strategy, "recipes", f"{strategy}1", r=2)
    grow(f"{strategy}1", "expand_branch", "code", f"{strategy}+branch", new_blocks=1)
    first, second = load_served(root / f"{strategy}1"), load_served(root / f"{strategy}+branch")
    for domain in ("stories", "recipes"):
        tok = first.tokenizer_for(domain)
        assert torch.equal(_logits(second.for_domain(domain), tok, domain), _logits(first.for_domain(domain), tok, domain))
    with pytest.raises(UserError, match=f"adapting a {strategy} model again is not supported by the full_ft method.*"
                                        "expand_branch"):
        grow(f"{strategy}1", "full_ft", "code", f"{strategy}+ft")


def test_adapting_a_chain_to_a_domain_it_serves_or_with_one_set_of_weights_is_refused(chain):
    root, grow = chain
    with pytest.raises(UserError, match="branch2 already serves 'recipes'"):
        grow("branch2", "expand_branch", "recipes", "again")
    with pytest.raises(UserError, match="adapting a expand_branch model again is not supported by the replay"):
        grow("branch1", "replay", "code", "replay-on-branch")


def test_a_domain_whose_tag_the_old_tokenizer_lacks_gets_it_appended(base, tmp_path, user_domains):
    """A user's domain on a model whose tokenizer was trained before it: whole-model strategies append
    its tag (one more row); strategies that promise the old domains bit for bit refuse, saying why."""
    from expandlm.adapt.run import AdaptSpec, adapt
    from expandlm.domains import get_domain
    from expandlm.training.loop import TrainConfig
    from tests.conftest import NANO_STEPS, write_jsonl

    root, _ = base
    write_jsonl(tmp_path / "poems.jsonl", [{"text": f"the rain falls soft on roof {i}"} for i in range(40)])
    (tmp_path / "poems.yaml").write_text("name: poems\ndata: {train: poems.jsonl}\n")
    get_domain(str(tmp_path / "poems.yaml"))
    old = load_served(root / "base")
    assert "<|poems|>" not in old.tokenizer.get_vocab()
    record = adapt(AdaptSpec(base=str(root / "base"), domain="poems", method="replay", out=str(tmp_path / "r"),
                             train=TrainConfig(**NANO_STEPS))).to_json()
    grown = load_served(tmp_path / "r")
    assert len(grown.tokenizer) == len(old.tokenizer) + 1 == grown.model.config.vocab_size
    assert grown.tokenizer.convert_tokens_to_ids("<|poems|>") == len(old.tokenizer)
    text = "Once upon a time there was a cat."
    assert grown.tokenizer(text)["input_ids"] == old.tokenizer(text)["input_ids"]  # old text reads as before
    assert record["bpb"]["poems"] > 0 and "stories" in record["forgetting"]
    with pytest.raises(UserError, match="has no tag <\\|poems\\|>, and lora keeps the old domains bit-identical"):
        adapt(AdaptSpec(base=str(root / "base"), domain="poems", method="lora", out=str(tmp_path / "l"),
                        train=TrainConfig(**NANO_STEPS)))
