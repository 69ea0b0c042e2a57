import pytest
import torch
from transformers import AutoModelForCausalLM

from expandlm.errors import UserError
from expandlm.model.llama import PRESETS, build_model, count_params, get_preset
from expandlm.data.tokenizer import bytes_tokenizer


class _Vocab:
    """Just what build_model needs from a tokenizer: a length and the special ids."""
    def __init__(self, n):
        self.n, self.bos_token_id, self.eos_token_id, self.pad_token_id = n, 0, 1, 2

    def __len__(self):
        return self.n


@pytest.mark.parametrize("name, expected", [("nano", 50e3), ("tiny", 1.4e6), ("small", 7e6), ("base", 30e6)])
def test_presets_match_design_sizes(name, expected):
    preset = get_preset(name)
    with torch.device("meta"):
        n = count_params(build_model(preset, _Vocab(preset.vocab)))
    assert 0.8 * expected <= n <= 1.15 * expected


def test_tied_embeddings_and_llama_shape():
    model = build_model(PRESETS["nano"], _Vocab(300))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.model_type == "llama" and model.config.max_position_embeddings == 128
    assert model.config.intermediate_size == 96  # llama2.c: 2/3 of 4*dim, multiple of 32


def test_save_load_standard_checkpoint(tmp_path):
    tok = bytes_tokenizer()
    model = build_model(PRESETS["nano"], tok, seed=3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[tok.bos_token_id, 70, 71, 72]])
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_seed_controls_init():
    a, b = build_model(PRESETS["nano"], _Vocab(300), seed=1), build_model(PRESETS["nano"], _Vocab(300), seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        get_preset("huge")
