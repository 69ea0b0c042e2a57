"""GGUF export: the file holds the model and tokenizer as llama.cpp reads them (checked with `gguf`'s
reader), and llama.cpp (`llama-cpp-python`) tokenizes and greedily decodes exactly as expandlm does."""
import numpy as np
import pytest

from expandlm.cli import main
from expandlm.domains import get_domain
from expandlm.engine import DecodeEngine
from expandlm.generate import request_ids
from expandlm.gguf_export import write_gguf
from expandlm.serving import load_served
from expandlm.errors import UserError
from expandlm.tokenizer import bytes_tokenizer, encode_texts, train_bpe
from tests.conftest import STORIES
from tests.test_engine import decisive, engine_tokens

gguf = pytest.importorskip("gguf")
TEXT = "Tom's 3 cats didn't like  the rain, so they ran home!\n\nThe end. 42 + 7 = 49?"


@pytest.fixture(scope="module")
def exported(two_domain_models, tmp_path_factory):
    """The recipes domain of the expand_branch model (its own tokenizer and model) as a GGUF file."""
    out = tmp_path_factory.mktemp("gguf") / "recipes.gguf"
    assert main(["export", str(two_domain_models["expand_branch"]), "--domain", "recipes", "--format", "gguf",
                 "--out", str(out)]) == 0
    served = load_served(two_domain_models["expand_branch"])
    return out, served.for_domain("recipes"), served.tokenizer_for("recipes")


def _field(reader, key):
    f = reader.fields[key]
    if len(f.types) > 1:  # an array: its items
        return [bytes(f.parts[i]).decode() if f.types[-1] == gguf.GGUFValueType.STRING else f.parts[i][0]
                for i in f.data]
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value[0]


def test_the_file_holds_the_model_and_tokenizer_as_llama_cpp_reads_them(exported):
    path, model, tok = exported
    reader = gguf.GGUFReader(path)
    cfg = model.config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == cfg.num_hidden_layers
    assert _field(reader, "llama.context_length") == cfg.max_position_embeddings
    assert (_field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tok) and tokens[tok.bos_token_id] == "<|bos|>" and "<|recipes|>" in tokens
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len([n for n in tensors if n.startswith("blk.")]) == 9 * cfg.num_hidden_layers
    embd = np.asarray(tensors["token_embd.weight"].data).reshape(cfg.vocab_size, cfg.hidden_size)
    assert np.array_equal(embd, model.model.embed_tokens.weight.detach().numpy())


try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed "
                                     "(pip install -e '.[test]'); the file is checked with gguf's reader only")


def _llama(path, context):
    # a float32 KV cache (llama.cpp's default is float16), so that llama.cpp computes in float32 as expandlm does
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=1, n_batch=context, verbose=False,
                           type_k=f32, type_v=f32, logits_all=True)


def _llama_greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_expandlm(exported):
    path, model, tok = exported
    llm = _llama(path, model.config.max_position_embeddings)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == encode_texts(tok, [TEXT])[0]
    assert llm.detokenize(encode_texts(tok, [TEXT])[0]).decode() == TEXT


@needs_llama_cpp
def test_llama_cpp_greedy_tokens_equal_expandlm(exported):
    path, model, tok = exported
    ids = request_ids(tok, get_domain("recipes"), "Banana Bread")
    llm = _llama(path, model.config.max_position_embeddings)
    assert _llama_greedy(llm, ids, 60) == engine_tokens(DecodeEngine(model), ids, 60)


@needs_llama_cpp
def test_llama_cpp_runs_a_tiny_preset_model_as_expandlm(tmp_path):
    tok = train_bpe(STORIES, 400)
    model = decisive("tiny", tokenizer=tok)
    write_gguf(model, tok, tmp_path / "tiny.gguf")
    ids = request_ids(tok, get_domain("stories"), "Once upon a time")
    llm = _llama(tmp_path / "tiny.gguf", model.config.max_position_embeddings)
    assert _llama_greedy(llm, ids, 200) == engine_tokens(DecodeEngine(model), ids, 200)


def test_a_tokenizer_without_merges_is_refused(tmp_path):
    with pytest.raises(UserError, match="no merges"):
        write_gguf(decisive("nano"), bytes_tokenizer(), tmp_path / "bytes.gguf")
