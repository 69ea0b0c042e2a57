"""Vocabulary expansion: old-domain text tokenizes identically, new tokens come from the new domain,
old embedding rows never move (docs/DESIGN.md, "Methods and formats")."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from expandlm.data import vocab
from expandlm.data.corpus import load_corpus
from expandlm.domains import get_domain
from expandlm.errors import UserError
from expandlm.model.llama import PRESETS, build_model
from expandlm.data.tokenizer import BOS, EOS, PAD, bytes_tokenizer, encode_texts, tokenizer_hash, train_bpe
from expandlm.training.loop import TrainConfig, causal_lm_loss, make_optimizer
from expandlm.data.vocab import NO_DECAY_ATTR, expand_tokenizer, grow_embeddings, train_only_new_rows
from tests.conftest import RECIPES, STORIES

RECIPE_TEXTS = [get_domain("recipes").render(r, "test") for r in RECIPES]
_old = train_bpe(STORIES, vocab_size=300)
_new = expand_tokenizer(_old, RECIPE_TEXTS, 40, keep_texts=STORIES)
NEW = 256


@pytest.fixture(autouse=True)
def _one_thread():
    """Nano-sized tensors gain nothing from threads, and two OpenMP threads on two busy shared cores
    stall each other (a 0.1 s test took 6 s when another job held the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _merges(tok) -> list[list[str]]:
    return [m if isinstance(m, list) else m.split(" ", 1)
            for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]


@pytest.fixture(scope="module")
def real(shared_data):
    """A nano-sized (512) stories tokenizer expanded with recipes, keeping 300 stories exact."""
    stories, recipes = get_domain("stories"), get_domain("recipes")
    d = {"stories": load_corpus(shared_data / "tinystories.jsonl.gz", stories, limit=2000).documents,
         "recipes": load_corpus(shared_data / "recipes.jsonl.gz", recipes, limit=1000).documents,
         "stories_valid": load_corpus(shared_data / "tinystories.valid.jsonl.gz", stories, limit=300).documents,
         "recipes_valid": load_corpus(shared_data / "recipes.valid.jsonl.gz", recipes).documents}
    d["keep"] = d["stories"][:300]
    d["old"] = train_bpe(d["stories"], vocab_size=512)
    d["new"] = expand_tokenizer(d["old"], d["recipes"], NEW, keep_texts=d["keep"])
    return d


def test_old_domain_text_tokenizes_identically(real):
    old, new = real["old"], real["new"]
    assert encode_texts(new, real["keep"]) == encode_texts(old, real["keep"])  # exact, by construction
    assert [new(t)["input_ids"] for t in real["keep"]] == [old(t)["input_ids"] for t in real["keep"]]
    # Elsewhere only empirical: held-out stories keep almost every token.
    n_old, n_new = (sum(map(len, encode_texts(t, real["stories_valid"]))) for t in (old, new))
    assert abs(n_new - n_old) / n_old < 0.01


def test_old_ids_tokens_and_merges_are_kept(real):
    old, new = real["old"], real["new"]
    assert len(new) == len(old) + NEW
    assert new.convert_ids_to_tokens(list(range(len(old)))) == old.convert_ids_to_tokens(list(range(len(old))))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(new, name) == getattr(old, name)
    assert new.convert_tokens_to_ids(["<|stories|>", "<|recipes|>"]) == old.convert_tokens_to_ids(
        ["<|stories|>", "<|recipes|>"])
    old_merges, new_merges = _merges(old), _merges(new)
    assert new_merges[:len(old_merges)] == old_merges and len(new_merges) == len(old_merges) + NEW
    added = new.convert_ids_to_tokens(list(range(len(old), len(new))))
    vocab = new.get_vocab()
    for (a, b), token in zip(new_merges[len(old_merges):], added):  # each appended merge makes its token
        assert a + b == token and token not in old.get_vocab() and a in vocab and b in vocab


def test_new_tokens_come_from_the_new_domain(real):
    old, new = real["old"], real["new"]
    ids = encode_texts(new, real["recipes_valid"])
    n_old, n_new = sum(map(len, encode_texts(old, real["recipes_valid"]))), sum(map(len, ids))
    assert n_new < 0.95 * n_old
    assert len({i for doc in ids for i in doc if i >= len(old)}) > NEW // 2  # most new tokens get used
    for word in (" pecans", " Salad", " pkg."):
        assert len(new.tokenize(word)) < len(old.tokenize(word))
    # Without keep_texts nothing is held back: "tablespoons" shrinks too (9 pieces before).
    free = expand_tokenizer(old, real["recipes"], NEW)
    assert len(free.tokenize(" tablespoons")) < len(old.tokenize(" tablespoons")) - 2


def test_keep_texts_stay_exact_even_when_learned_merges_would_fire(monkeypatch):
    """The final check bans any new token that still fires on keep_texts (here the pair filter is off)."""
    assert encode_texts(expand_tokenizer(_old, RECIPE_TEXTS, 40), STORIES) != encode_texts(_old, STORIES)
    learn = vocab._learn_merges
    monkeypatch.setattr(vocab, "_learn_merges", lambda v, s, forbidden, n: learn(v, s, set(), n))
    new = expand_tokenizer(_old, RECIPE_TEXTS, 40, keep_texts=STORIES)
    assert encode_texts(new, STORIES) == encode_texts(_old, STORIES) and len(new) > len(_old)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_of_any_text(text):
    assert _new.decode(encode_texts(_new, [text])[0]) == text


def test_saved_expanded_tokenizer_loads_with_auto_tokenizer(tmp_path):
    _new.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    text = RECIPE_TEXTS[0] + STORIES[0]
    assert len(auto) == len(_new) and auto(text)["input_ids"] == _new(text)["input_ids"]
    assert tokenizer_hash(auto) == tokenizer_hash(_new)
    assert auto.bos_token == BOS and auto.eos_token == EOS and auto.pad_token == PAD


def test_missing_tags_are_appended_before_learned_tokens_and_bytes_tokenizer_expands():
    new = expand_tokenizer(_old, RECIPE_TEXTS, 10, extra_tags=["<|poems|>"])
    assert new.convert_tokens_to_ids("<|poems|>") == len(_old) and "<|poems|>" in new.all_special_tokens
    assert len(new) == len(_old) + 11
    base = bytes_tokenizer()
    grown = expand_tokenizer(base, RECIPE_TEXTS, 20)
    assert len(grown) == len(base) + 20 and len(encode_texts(grown, RECIPE_TEXTS[:1])[0]) < len(RECIPE_TEXTS[0])


def test_grow_embeddings_keeps_old_rows_and_logits():
    model = build_model(PRESETS["nano"], _old).eval()
    old_weight = model.get_input_embeddings().weight.detach().clone()
    x = torch.randint(0, len(_old), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=x).logits
    assert grow_embeddings(model, len(_new)) == len(_old)
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight and model.config.vocab_size == len(_new)
    assert torch.equal(weight[:len(_old)], old_weight)
    assert torch.equal(weight[len(_old):], old_weight.mean(0).expand(len(_new) - len(_old), -1))
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert after.shape[-1] == len(_new) and torch.equal(after[..., :len(_old)], before)


def _train(model, decay_embedding: bool, steps: int = 6):
    """A few real AdamW steps with the optimizer `train` builds. With `decay_embedding` the embedding
    loses its no-decay mark first, as it would with an optimizer that ignored the mark."""
    weight = model.get_input_embeddings().weight
    if decay_embedding:
        delattr(weight, NO_DECAY_ATTR)
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    group = next(g for g in opt.param_groups if any(p is weight for p in g["params"]))
    assert group["weight_decay"] == (0.1 if decay_embedding else 0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        causal_lm_loss(model, torch.randint(0, len(_new), (4, 17), generator=g)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("decay_embedding", [False, True])
def test_train_only_new_rows(decay_embedding):
    model = build_model(PRESETS["nano"], _old)
    num_old = grow_embeddings(model, len(_new))
    handle = train_only_new_rows(model, num_old)
    weight = model.get_input_embeddings().weight
    assert getattr(weight, NO_DECAY_ATTR) is True and weight.requires_grad
    start, norm_start = weight.detach().clone(), model.model.norm.weight.detach().clone()
    _train(model, decay_embedding)
    assert (weight[num_old:] != start[num_old:]).any(dim=1).all()  # every new row trained
    assert not torch.equal(model.model.norm.weight, norm_start)  # the rest of the network trained too
    # Zero gradients keep old rows bit for bit only without weight decay: decay shrinks every row.
    assert torch.equal(weight[:num_old], start[:num_old]) is not decay_embedding
    handle.remove()
    causal_lm_loss(model, torch.randint(0, len(_new), (2, 9))).backward()
    assert weight.grad[:num_old].abs().sum() > 0


def test_errors():
    with pytest.raises(UserError, match="positive"):
        expand_tokenizer(_old, RECIPE_TEXTS, 0)
    with pytest.raises(UserError, match="no new-domain text"):
        expand_tokenizer(_old, [], 10)
    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    whitespace_bpe = Tokenizer(models.BPE({"a": 0, "b": 1}, []))
    whitespace_bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    for backend in (word_level, whitespace_bpe):
        with pytest.raises(UserError, match="byte-level BPE"):
            expand_tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend), RECIPE_TEXTS, 10)
    model = build_model(PRESETS["nano"], _old)
    with pytest.raises(UserError, match="shrink"):
        grow_embeddings(model, len(_old) - 1)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(UserError, match="tied"):
        train_only_new_rows(model, len(_old))


def test_grow_embeddings_gives_new_tokens_the_padded_rows_first():
    model = build_model(PRESETS["nano"], bytes_tokenizer(), seed=0)
    rows = model.get_input_embeddings().weight.detach().clone()
    tokens = rows.shape[0] - 3  # a tokenizer 3 tokens short of the embedding, as a padded checkpoint's
    assert grow_embeddings(model, tokens + 1, first_new=tokens) == rows.shape[0]
    grown = model.get_input_embeddings().weight
    assert grown.shape == rows.shape and torch.equal(grown[:tokens], rows[:tokens])
    assert torch.allclose(grown[tokens], rows[:tokens].mean(dim=0)) and torch.equal(grown[tokens + 1:], rows[tokens + 1:])
    assert grow_embeddings(model, tokens + 5, first_new=tokens) == rows.shape[0]  # beyond the padding: grows
    assert model.get_input_embeddings().weight.shape[0] == tokens + 5
    with pytest.raises(UserError, match="cannot shrink"):
        grow_embeddings(model, tokens - 1, first_new=tokens)


def test_grow_embeddings_gives_rows_to_tokens_the_embedding_lacks_too():
    """A tokenizer with tokens beyond its checkpoint's embedding (a Qwen2Tokenizer adds its <|endoftext|>):
    those get rows as well as the new ones, all at the mean of the trained rows."""
    model = build_model(PRESETS["nano"], bytes_tokenizer(), seed=0)
    rows = model.get_input_embeddings().weight.detach().clone()
    tokens = rows.shape[0] + 1  # one token with no row
    assert grow_embeddings(model, tokens + 1, first_new=tokens) == rows.shape[0]
    grown = model.get_input_embeddings().weight
    assert grown.shape[0] == tokens + 1 and torch.equal(grown[:rows.shape[0]], rows)
    assert torch.allclose(grown[rows.shape[0]:], rows.mean(dim=0).expand(2, -1))
