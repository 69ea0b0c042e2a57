"""GGUF export: the file holds the model and tokenizer as llama.cpp reads them (checked with `gguf`'s
reader), and llama.cpp's own server (`xllamacpp`, prebuilt) tokenizes and greedily decodes exactly as expandlm does."""
import httpx
import numpy as np
import pytest

from expandlm.cli import main
from expandlm.domains import get_domain
from expandlm.inference.engine import DecodeEngine
from expandlm.inference.generate import request_ids
from expandlm.formats.gguf import write_gguf
from expandlm.formats.served import load_served
from expandlm.errors import UserError
from expandlm.data.tokenizer import bytes_tokenizer, encode_texts, train_bpe
from tests.conftest import STORIES
from tests.test_inference_engine import decisive, engine_tokens

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


try:  # llama.cpp's server, prebuilt (llama-cpp-python compiles all of llama.cpp on install: ~35 min on 2 cores)
    import xllamacpp
except ImportError:
    xllamacpp = None
needs_llama_cpp = pytest.mark.skipif(xllamacpp is None, reason="xllamacpp is not installed "
                                     "(pip install -e '.[test]'); the file is checked with gguf's reader only")


class LlamaServer:
    """The GGUF file served by llama.cpp's own server (llama-server, in process through xllamacpp), asked over its
    HTTP API on loopback as a user would: /tokenize, /detokenize, and greedy /completion."""

    def __init__(self, path, context: int):
        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = params.n_batch = params.n_ubatch = context
        params.n_parallel = 1
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
        # a float32 KV cache and no flash attention (llama.cpp's defaults store keys and values in float16), so
        # that llama.cpp computes in float32 as expandlm does
        params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.server = xllamacpp.Server(params)
        self.http = httpx.Client(base_url=self.server.listening_address, timeout=120)

    def close(self):
        self.http.close()
        del self.server  # stops its loop and frees the model

    def ask(self, route: str, **body) -> dict:
        response = self.http.post(route, json=body)
        response.raise_for_status()
        return response.json()

    def tokenize(self, text: str) -> list[int]:
        return self.ask("/tokenize", content=text, add_special=False, parse_special=False)["tokens"]

    def detokenize(self, ids: list[int]) -> str:
        return self.ask("/detokenize", tokens=ids)["content"]

    def completion(self, ids: list[int], n: int) -> dict:
        """Up to n tokens, llama.cpp's top-1 each step; like any llama.cpp generation it ends at an end-of-text.
        The answer holds the `tokens` and llama.cpp's own `timings`."""
        return self.ask("/completion", prompt=ids, n_predict=n, samplers=["top_k"], top_k=1, return_tokens=True,
                        cache_prompt=False)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self.completion(ids, n)["tokens"]


@pytest.fixture
def llama_cpp():
    opened = []

    def start(path, context):
        opened.append(LlamaServer(path, context))
        return opened[-1]
    yield start
    for server in opened:
        server.close()


def _until_end(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_expandlm(exported, llama_cpp):
    path, model, tok = exported
    llm = llama_cpp(path, model.config.max_position_embeddings)
    assert llm.tokenize(TEXT) == encode_texts(tok, [TEXT])[0]
    assert llm.detokenize(encode_texts(tok, [TEXT])[0]) == TEXT


@needs_llama_cpp
def test_llama_cpp_greedy_tokens_equal_expandlm(exported, llama_cpp):
    path, model, tok = exported
    ids = request_ids(tok, get_domain("recipes"), "Banana Bread")
    llm = llama_cpp(path, model.config.max_position_embeddings)
    assert llm.greedy(ids, 60) == _until_end(engine_tokens(DecodeEngine(model), ids, 60), tok.eos_token_id)


@needs_llama_cpp
def test_llama_cpp_runs_a_tiny_preset_model_as_expandlm(tmp_path, llama_cpp):
    tok = train_bpe(STORIES, 400)
    model = decisive("tiny", tokenizer=tok)
    write_gguf(model, tok, tmp_path / "tiny.gguf")
    ids = request_ids(tok, get_domain("stories"), "Once upon a time")
    llm = llama_cpp(tmp_path / "tiny.gguf", model.config.max_position_embeddings)
    assert llm.greedy(ids, 200) == _until_end(engine_tokens(DecodeEngine(model), ids, 200), tok.eos_token_id)


def test_a_tokenizer_without_merges_is_refused(tmp_path):
    with pytest.raises(UserError, match="no merges"):
        write_gguf(decisive("nano"), bytes_tokenizer(), tmp_path / "bytes.gguf")


def test_a_file_expandlm_did_not_write_is_never_replaced(tmp_path):
    tok = train_bpe(STORIES, 400)
    model = decisive("nano", tokenizer=tok)
    theirs, foreign_gguf, ours = tmp_path / "notes.gguf", tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    theirs.write_text("not a model")
    writer = gguf.GGUFWriter(str(foreign_gguf), "llama")  # a GGUF from another tool (llama.cpp's converter)
    writer.add_name("theirs")
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file()
    writer.close()
    kept = {p: p.read_bytes() for p in (theirs, foreign_gguf)}
    for path in kept:
        with pytest.raises(UserError, match=f"{path}: exists and expandlm did not write it"):
            write_gguf(model, tok, path)
    assert {p: p.read_bytes() for p in kept} == kept
    with pytest.raises(UserError, match="is a folder; --format gguf writes one file"):
        write_gguf(model, tok, tmp_path)
    write_gguf(model, tok, ours)
    write_gguf(model, tok, ours, name="again")  # expandlm's own file: replaced
    assert _field(gguf.GGUFReader(str(ours)), "general.name") == "again"


def _rounded(model, dtype: str):
    """`model` with its matrices as a `dtype` GGUF file holds them (gguf's own quantizer for q8_0), in float32."""
    import copy
    import torch
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2 and dtype == "q8_0":
                kind = gguf.GGMLQuantizationType.Q8_0
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), kind), kind)))
            elif p.dim() == 2:
                p.copy_(p.to({"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]).float())
    return out


@needs_llama_cpp
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_each_gguf_dtype_is_written_as_asked_and_llama_cpp_runs_it(tmp_path, llama_cpp, dtype):
    """f16 carries these weights exactly enough that llama.cpp's greedy tokens are expandlm's; bf16 and q8_0
    round more (and llama.cpp's q8_0 matmul rounds the activations to 8 bits too): their next-token
    log-probabilities are compared, against the same model with its weights rounded as the file holds them."""
    import torch
    tok = train_bpe(STORIES, 400)
    model = decisive("tiny", tokenizer=tok)
    f32, path = tmp_path / "f32.gguf", tmp_path / f"{dtype}.gguf"
    write_gguf(model, tok, f32)
    write_gguf(model, tok, path, dtype=dtype)
    kind = gguf.GGMLQuantizationType[dtype.upper()]
    tensors = gguf.GGUFReader(str(path)).tensors
    assert {t.tensor_type for t in tensors if len(t.shape) == 2} == {kind}
    assert {t.tensor_type for t in tensors if len(t.shape) == 1} == {gguf.GGMLQuantizationType.F32}  # norms
    assert path.stat().st_size < {"f16": 0.55, "bf16": 0.55, "q8_0": 0.3}[dtype] * f32.stat().st_size
    ids = request_ids(tok, get_domain("stories"), "Once upon a time")
    llm = llama_cpp(path, model.config.max_position_embeddings)
    if dtype == "f16":
        assert llm.greedy(ids, 100) == _until_end(engine_tokens(DecodeEngine(model), ids, 100), tok.eos_token_id)
    answer = llm.ask("/completion", prompt=ids, n_predict=1, samplers=["top_k"], top_k=1, n_probs=5,
                     cache_prompt=False, post_sampling_probs=False)
    theirs = {p["id"]: p["logprob"] for p in answer["completion_probabilities"][0]["top_logprobs"]}
    with torch.no_grad():
        ours = torch.log_softmax(_rounded(model, dtype)(torch.tensor([ids])).logits[0, -1].float(), -1)
    assert max(theirs, key=theirs.get) == int(ours.argmax())
    # llama.cpp rounds the activations too (to f16, bf16, or 8-bit blocks for q8_0) where expandlm keeps f32
    tolerance = {"f16": 0.03, "bf16": 0.1, "q8_0": 0.25}[dtype]
    assert all(abs(lp - float(ours[i])) < tolerance for i, lp in theirs.items()), (theirs, ours.topk(5))


def test_export_writes_the_dtype_asked_and_a_checkpoint_refuses_one(two_domain_models, tmp_path, capsys):
    out = tmp_path / "recipes.q8_0.gguf"
    assert main(["export", str(two_domain_models["expand_branch"]), "--domain", "recipes", "--format", "gguf",
                 "--dtype", "q8_0", "--out", str(out)]) == 0
    assert _field(gguf.GGUFReader(str(out)), "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["export", str(two_domain_models["expand_branch"]), "--domain", "recipes", "--dtype", "f16",
                 "--out", str(tmp_path / "ckpt")]) == 2
    assert "--dtype f16 applies to --format gguf" in capsys.readouterr().err and not (tmp_path / "ckpt").exists()


def test_a_matrix_that_is_no_whole_number_of_q8_0_blocks_is_written_f16(tmp_path):
    """q8_0 packs 32 values a block along a row; rows of 48 (this model's hidden size) are written in f16,
    as llama.cpp's converter falls back, and the others in q8_0."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = train_bpe(STORIES, 400)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    write_gguf(LlamaForCausalLM(config), tok, tmp_path / "odd.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "odd.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 128
    assert types["blk.0.ffn_up.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.F16  # rows of 48
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
