"""The loss over a large vocabulary: `next_token_nll` applies the head in chunks where a batch's logits
would pass LOGITS_AT_ONCE, and gives the loss the whole call gives; a domain's view of a model (an
adapter off for the base domain) is called whole, so its loss is that domain's. The bounds are
lowered here so that tiny models take the chunked path a 49k-token vocabulary takes."""
import pytest
import torch

from conftest import STORIES, write_jsonl
from expandlm.cli import main
from expandlm.data.corpus import load_corpus
from expandlm.data.shards import build_shard
from expandlm.evaluation.bpb import evaluate_bpb
from expandlm.formats.served import load_served
from expandlm.model import window
from expandlm.model.window import next_token_nll
from test_formats_pretrained import save_checkpoint
from transformers import AutoModelForCausalLM


@pytest.fixture
def chunked(monkeypatch):
    """Every batch over the bound, in chunks of a few rows."""
    monkeypatch.setattr(window, "LOGITS_AT_ONCE", 1)
    monkeypatch.setattr(window, "CHUNK_LOGITS", 3 * 320)


def test_the_chunked_head_gives_the_whole_calls_loss_and_gradients(chunked, tmp_path):
    save_checkpoint(tmp_path / "base", "llama")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    whole = torch.nn.functional.cross_entropy(model(input_ids=ids[:, :-1]).logits.reshape(-1, model.config.vocab_size),
                                              ids[:, 1:].reshape(-1))
    whole.backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad()
    loss = next_token_nll(model, ids[:, :-1], ids[:, 1:], reduction="mean")
    loss.backward()
    torch.testing.assert_close(loss, whole)
    torch.testing.assert_close(model.lm_head.weight.grad, expected)


def test_the_base_domain_of_a_lora_folder_scores_as_the_checkpoint_where_the_head_is_chunked(chunked, shared_data,
                                                                                             tmp_path):
    """Through the chunked path the view's decoder, called alone, once ran with the adapter on."""
    save_checkpoint(tmp_path / "base", "llama")
    assert main(["adapt", "--base", str(tmp_path / "base"), "--domain", "recipes", "--data",
                 str(shared_data / "recipes.jsonl.gz"), "--strategy", "lora", "--limit", "8", "--val-limit", "2",
                 "--max-steps", "3", "--batch-size", "2", "--context", "64", "--eval-interval", "0",
                 "--no-progress", "--out", str(tmp_path / "lora")]) == 0
    grown, original = load_served(tmp_path / "lora", device="cpu"), load_served(tmp_path / "base", device="cpu")
    text = load_corpus(str(write_jsonl(tmp_path / "stories.jsonl", [{"text": s} for s in STORIES])),
                       original.domain("base"))
    shard = build_shard(text, original.tokenizer_for("base"))
    on = evaluate_bpb(grown.for_domain("recipes"), shard)["bpb"]  # the adapter changes the score: it is trained
    off = evaluate_bpb(grown.for_domain("base"), shard)["bpb"]
    assert off == pytest.approx(evaluate_bpb(original.for_domain("base"), shard)["bpb"], rel=1e-6)
    assert on != pytest.approx(off, rel=1e-4)
