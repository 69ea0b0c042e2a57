import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_study(config, out: Path) -> dict:
    """`expandlm compare CONFIG --out OUT` (a path, or a config of configs/ by name); its results.json."""
    from expandlm.cli import main
    path = config if Path(config).suffix else REPO / "configs" / f"{config}.yaml"
    assert main(["compare", str(path), "--out", str(out), "--no-progress"]) == 0
    return json.loads((Path(out) / "results.json").read_text())
SHARED_DATA = Path(os.environ.get("EXPANDLM_DATA", REPO.parent / "shared" / "data"))

STORIES = [
    "Once upon a time, there was a little cat named Tom. Tom liked to play in the sun.",
    "Lily had a red ball. She threw it high and her dog ran after it. They were happy.",
    "The big tree was old. A bird lived in it and sang every morning to the children.",
    "Ben wanted a cake. His mom said, \"Let's bake one together!\" They mixed flour and eggs.",
] * 15
RECIPES = [
    {"title": "Banana Bread", "ingredients": ["3 ripe bananas", "2 cups flour", "1 cup sugar"],
     "directions": ["Mash the bananas.", "Mix everything.", "Bake at 350F for 1 hour."]},
    {"title": "Tomato Soup", "ingredients": ["6 tomatoes", "1 onion"],
     "directions": ["Chop the vegetables.", "Simmer for 30 minutes.", "Blend until smooth."]},
] * 20


def finishes(code: str, within_s: float = 60.0) -> bool:
    """Whether `code` (Python, in a fresh process) finishes within `within_s`. For a check of linear time
    that load cannot fake: the inputs are sized so that the quadratic or exponential algorithm it replaced
    would take hours, and the linear one milliseconds (the bound is the process's start-up, many times over)."""
    import subprocess
    import sys
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=within_s)
    except subprocess.TimeoutExpired:
        return False
    assert done.returncode == 0, done.stderr[-2000:]
    return True


def write_jsonl(path: Path, records, gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def stories_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "stories.jsonl", [{"text": t} for t in STORIES])


@pytest.fixture
def recipes_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "recipes.jsonl.gz", RECIPES, gz=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "tinystories.jsonl.gz").exists():
        pytest.skip(f"the shared corpora are not at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def device():
    """Where the tests run models: the GPU on a host that has one (so that the suite checks the GPU paths
    there), else the CPU. Tests compare tensors of different origins on the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Session- and module-wide fixtures (a served model's router) cache under a temp folder too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXPANDLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Token shards of a test go to its own temp folder, never to ~/.cache."""
    monkeypatch.setenv("EXPANDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def user_domains():
    """Domains a test declares are forgotten after it (the registry is process-wide)."""
    from expandlm.domains import DOMAINS

    before = dict(DOMAINS)
    yield
    DOMAINS.clear()
    DOMAINS.update(before)


NANO_STEPS = dict(max_steps=4, batch_size=4, eval_interval=0, eval_docs=5, progress=False, log_interval=2)


@pytest.fixture(scope="session")
def two_domain_models(tmp_path_factory) -> dict[str, Path]:
    """A nano stories expert trained for a few steps, and three models that also serve recipes:
    `expand_paths` (one model, a gated path per domain), `expand_branch` (recipes' own tokenizer and
    model over the stories blocks) and `lora` (an adapter on for recipes, off for stories).
    Session-wide: the serving, engine and export tests share them."""
    from expandlm.adapt.run import AdaptSpec, adapt
    from expandlm.training.expert import ExpertSpec, train_expert
    from expandlm.training.loop import TrainConfig

    root = tmp_path_factory.mktemp("two_domains")
    stories = write_jsonl(root / "stories.jsonl", [{"text": t} for t in STORIES])
    recipes = write_jsonl(root / "recipes.jsonl", RECIPES)
    train_expert(ExpertSpec(domain="stories", data=str(stories), out=str(root / "base"), preset="nano",
                            cache_dir=str(root / "cache"), vocab_size=400, train=TrainConfig(**NANO_STEPS)))
    models = {"base": root / "base"}
    for strategy in ("expand_paths", "expand_branch", "lora"):
        adapt(AdaptSpec(base=str(root / "base"), method=strategy, domain="recipes", data=str(recipes),
                        out=str(root / strategy), cache_dir=str(root / "cache"), train=TrainConfig(**NANO_STEPS)))
        models[strategy] = root / strategy
    return models


CODE = ["def add(a, b):\n    return a + b\n", "def square(x):\n    \"\"\"x times x.\"\"\"\n    return x * x\n",
        "def first(items):\n    for item in items:\n        return item\n    return None\n"] * 20


@pytest.fixture(scope="session")
def experts(tmp_path_factory) -> dict[str, Path]:
    """Experts of one common start (the merging, distillation and combination tests share them): a nano stories base; full fine-tunes of it on recipes and on code; LoRA adapters of it on each."""
    from expandlm.adapt.run import AdaptSpec, adapt
    from expandlm.training.expert import ExpertSpec, train_expert
    from expandlm.training.loop import TrainConfig

    root = tmp_path_factory.mktemp("merge")
    data = {"stories": write_jsonl(root / "stories.jsonl", [{"text": t} for t in STORIES]),
            "recipes": write_jsonl(root / "recipes.jsonl", RECIPES),
            "code": write_jsonl(root / "code.jsonl", [{"text": t} for t in CODE])}
    cache = str(root / "cache")
    train_expert(ExpertSpec(domain="stories", data=str(data["stories"]), out=str(root / "base"), preset="nano",
                            cache_dir=cache, vocab_size=400, train=TrainConfig(**NANO_STEPS)))
    out = {"base": root / "base", "root": root}
    for strategy in ("full_ft", "lora"):
        for domain in ("recipes", "code"):
            name = f"{domain}-{strategy}"
            adapt(AdaptSpec(base=str(root / "base"), method=strategy, domain=domain, data=str(data[domain]),
                            out=str(root / name), cache_dir=cache, train=TrainConfig(**{**NANO_STEPS, "lr": 0.01})))
            out[name] = root / name
    return out
