import pytest
import torch

from expandlm.domains import get_domain
from expandlm.errors import UserError
from expandlm.inference.generate import SamplingConfig, generate, request_ids
from expandlm.model.llama import PRESETS, build_model
from expandlm.data.tokenizer import bytes_tokenizer

tok = bytes_tokenizer()
stories = get_domain("stories")


@pytest.fixture(scope="module")
def model(device):
    return build_model(PRESETS["nano"], tok, seed=0).eval().to(device)


def test_request_starts_with_bos_and_tag():
    ids = request_ids(tok, stories, "Hi <|eos|>")
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|stories|>")]
    assert tok.eos_token_id not in ids[2:] and tok.decode(ids[2:]) == "Hi <|eos|>"


def test_seeded_sampling_is_reproducible_and_batched(model):
    cfg = SamplingConfig(seed=7, max_new_tokens=20)
    a = generate(model, tok, stories, "Once", num_samples=3, sampling=cfg)
    b = generate(model, tok, stories, "Once", num_samples=3, sampling=cfg)
    assert [s.text for s in a] == [s.text for s in b] and len(a) == 3
    assert all(s.text.startswith("Once") for s in a)
    assert len({s.text for s in a}) > 1
    c = generate(model, tok, stories, "Once", num_samples=3, sampling=SamplingConfig(seed=8, max_new_tokens=20))
    assert [s.text for s in c] != [s.text for s in a]


def test_text_ends_at_eos_and_unfinished_samples_are_flagged(model, monkeypatch):
    ids = request_ids(tok, stories, "x")
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    rows = [ids + [a, tok.eos_token_id, tok.pad_token_id], ids + [a, b, b]]
    monkeypatch.setattr(model, "generate", lambda **kw: torch.tensor(rows))
    done, cut = generate(model, tok, stories, "x", num_samples=2, sampling=SamplingConfig(max_new_tokens=3),
                         engine="hf")
    assert (done.text, done.finished) == ("xa", True)
    assert (cut.text, cut.finished, cut.new_tokens) == ("xabb", False, 3)


def test_streams_one_sample(model, capsys):
    s = generate(model, tok, stories, "Hey", sampling=SamplingConfig(seed=1, max_new_tokens=10), stream=True)[0]
    assert capsys.readouterr().out.startswith("Hey")
    assert s.text.startswith("Hey")


def test_prompt_longer_than_context(model):
    with pytest.raises(UserError, match="context is 128"):
        generate(model, tok, stories, "x" * 500)
