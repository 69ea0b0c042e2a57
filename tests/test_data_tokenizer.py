from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from expandlm.data.tokenizer import (BOS, EOS, PAD, bytes_tokenizer, encode_texts, gpt2_tokenizer, load_tokenizer,
                                require_tag, tokenizer_hash, train_bpe)
from expandlm.domains import get_domain
from tests.conftest import STORIES

import pytest
from expandlm.errors import UserError

TEXTS = STORIES + ["Mix 2 cups flour, 1 tsp salt; bake 20–25 min at 180°C.", "naïve café 🎉 日本語"]
_tok = train_bpe(TEXTS * 3, vocab_size=400)
unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(unicode_text)
def test_round_trip_of_any_text(text):
    ids = encode_texts(_tok, [text])[0]
    assert _tok.decode(ids) == text
    assert _tok.unk_token_id is None or _tok.unk_token_id not in ids


@settings(max_examples=100, deadline=None)
@given(unicode_text)
def test_generic_bytes_tokenizer_round_trip(text):
    tok = bytes_tokenizer()
    ids = encode_texts(tok, [text])[0]
    assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text


def test_special_tokens_and_tags():
    for token in (BOS, EOS, PAD, "<|stories|>", "<|recipes|>"):
        assert token in _tok.all_special_tokens
    assert _tok.bos_token == BOS and _tok.eos_token == EOS and _tok.pad_token == PAD
    assert require_tag(_tok, get_domain("recipes")) == _tok.convert_tokens_to_ids("<|recipes|>")
    assert len(_tok) <= 400


def test_special_strings_in_documents_stay_plain_text():
    ids = encode_texts(_tok, ["before <|eos|> after"])[0]
    assert _tok.eos_token_id not in ids
    assert _tok.decode(ids) == "before <|eos|> after"


def test_saved_tokenizer_loads_with_auto_tokenizer(tmp_path):
    _tok.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto("Lily had a red ball.")["input_ids"] == _tok("Lily had a red ball.")["input_ids"]
    assert tokenizer_hash(auto) == tokenizer_hash(_tok)
    assert tokenizer_hash(load_tokenizer(tmp_path)) == tokenizer_hash(_tok)


def test_too_small_vocab_and_missing_folder(tmp_path):
    with pytest.raises(UserError, match="too small"):
        train_bpe(TEXTS, vocab_size=100)
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_gpt2_baseline_matches_gpt2(shared_data):
    tok = gpt2_tokenizer(shared_data / "tokenizers" / "gpt2")
    assert encode_texts(tok, ["Hello world"])[0] == [15496, 995]
    assert len(tok) == 50257 + 6 and tok.convert_ids_to_tokens(50257) == BOS  # bos, eos, pad, 3 built-in tags
    assert load_tokenizer("gpt2", shared_data).decode(encode_texts(tok, ["naïve 🎉"])[0]) == "naïve 🎉"
