"""A checkpoint that transformers saved (no expandlm.json) is a model: its own behaviour is one plain
domain, requested as its tokenizer starts a text. Tiny randomly initialised Llama, Mistral and Qwen2
checkpoints, built here (no network), read by `eval`, `generate`, `export` and `serve`, must give what
transformers gives on the same text."""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

from conftest import REPO, STORIES, write_jsonl
from expandlm.cli import main
from expandlm.formats.served import load_served
from expandlm.serve.app import create_app
from expandlm.serve.catalog import Catalog
from expandlm.serve.scheduler import Scheduler

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, tie_word_embeddings=False)
# name: (config class, model class, extra config, the engine's reason to hand it to transformers, or None)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}, None),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}, None),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}, "attention biases"),
    "mistral-window": (MistralConfig, MistralForCausalLM, {"sliding_window": 16}, "sliding-window attention"),
    "llama-rope-scaling": (LlamaConfig, LlamaForCausalLM,
                           {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
                           "RoPE scaling 'linear'"),
}
PROMPT = "Once upon a time"


def byte_level_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE as pretrained models have them: Llama's adds its BOS `<s>` to every text;
    Qwen2's adds nothing and has no BOS, only `<|endoftext|>`."""
    specials = ["<s>", "</s>"] if adds_bos else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(STORIES, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def save_checkpoint(folder, name: str, chat_template: str | None = None, adds_bos: bool | None = None,
                    **fields) -> None:
    """A tiny random checkpoint of architecture `name` as transformers saves it, and nothing of expandlm's.
    With `chat_template`, an instruct model's: ChatML's turn tokens and that template on its tokenizer,
    and a generation config whose turn ends at <|im_end|> as well as at the tokenizer's EOS (Qwen's list).
    `name` may also be any other model type transformers builds (`AutoConfig.for_model`), with the config
    `fields` it needs beyond SHAPE's; `adds_bos` picks the tokenizer (default: Llama's, none for Qwen2)."""
    config_cls, model_cls, extra, _ = ARCHITECTURES.get(name) or (
        lambda **kw: AutoConfig.for_model(name, **kw), AutoModelForCausalLM.from_config, {}, None)
    tok = byte_level_tokenizer(adds_bos=not name.startswith("qwen2") if adds_bos is None else adds_bos)
    if chat_template:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = chat_template
    torch.manual_seed(0)
    config = config_cls(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        **{**SHAPE, **extra, **fields})
    model = model_cls(config)
    if chat_template:
        model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    """(folder, architecture name): a checkpoint of each architecture."""
    folder = tmp_path_factory.mktemp(request.param)
    save_checkpoint(folder, request.param)
    return folder, request.param


def plain_ids(tok, text: str) -> list[int]:
    """The text as the tokenizer encodes it for its model; one that adds no BOS gets its EOS in front,
    the token a text follows in a pretraining stream."""
    ids = tok(text)["input_ids"]
    return ids if ids[:1] == [tok.bos_token_id] and tok.bos_token_id is not None else [tok.eos_token_id, *ids]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def folder_digest(folder) -> str:
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


def test_the_folder_serves_one_plain_domain_named_by_the_user(checkpoint):
    folder, _ = checkpoint
    served = load_served(folder, device="cpu")
    assert served.domains == ["base"] and served.card.plain == ["base"] and served.card.format == "checkpoint"
    assert served.domain("base").plain
    named = load_served(folder, device="cpu", base_domain="stories")
    assert named.domains == ["stories"] and named.domain("stories").plain  # a built-in's spec, without its tag


def test_bpb_of_the_base_domain_equals_a_plain_transformers_forward(checkpoint, capsys, tmp_path):
    folder, _ = checkpoint
    docs = STORIES[:4]
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in docs])
    before = folder_digest(folder)
    code, out, err = run(capsys, "eval", "--model", folder, "--data", data, "--out", tmp_path / "eval.json")
    assert code == 0, err
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    nats = 0.0
    for doc in docs:
        ids = torch.tensor([plain_ids(tok, doc) + [tok.eos_token_id]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        nats += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    expected = nats / math.log(2) / sum(len(d.encode()) for d in docs)
    assert math.isclose(json.loads(out)["bpb"], expected, rel_tol=1e-5)
    assert folder_digest(folder) == before  # read, never written


def transformers_greedy(folder, prompt: str, max_new: int) -> tuple[str, str]:
    """(prompt and continuation, continuation) of transformers' own greedy generate, up to EOS."""
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    ids = plain_ids(tok, prompt)
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                         max_new_tokens=max_new, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    return tok.decode(ids + new, skip_special_tokens=True), tok.decode(new, skip_special_tokens=True)


def test_greedy_generate_equals_transformers_and_says_which_engine_ran(checkpoint, capsys):
    folder, name = checkpoint
    code, out, err = run(capsys, "generate", "--model", folder, "--prompt", PROMPT, "--temperature", "0",
                         "--max-new-tokens", "12", "--json")
    assert code == 0, err
    assert json.loads(out)["samples"][0]["text"] == transformers_greedy(folder, PROMPT, 12)[0]
    why = ARCHITECTURES[name][3]
    if why is None:  # the fast engine ran it, and said nothing
        assert err == ""
    else:  # one line naming why transformers generated instead, never a traceback
        assert len(err.splitlines()) == 1 and why in err and "generating with transformers" in err


def test_export_writes_the_base_domain_as_the_same_checkpoint(checkpoint, capsys, tmp_path):
    folder, _ = checkpoint
    code, _, err = run(capsys, "export", folder, "--out", tmp_path / "out")
    assert code == 0, err
    card = json.loads((tmp_path / "out" / "expandlm.json").read_text())
    assert card["domains"] == card["plain"] == ["base"]
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([plain_ids(tok, PROMPT)])
    exported, original = (AutoModelForCausalLM.from_pretrained(f).eval() for f in (tmp_path / "out", folder))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, original(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")(PROMPT)["input_ids"] == tok(PROMPT)["input_ids"]


def test_serve_answers_the_base_domain_as_transformers_does(checkpoint):
    from fastapi.testclient import TestClient

    folder, _ = checkpoint
    scheduler = Scheduler(max_batch=2, max_waiting=4, threads=1).start()
    try:
        with TestClient(create_app(Catalog([load_served(folder, device="cpu")]), scheduler)) as http:
            body = {"model": "base", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            answer = http.post("/v1/completions", json=body).json()
    finally:
        scheduler.stop()
    # a random model writes stray bytes: the server holds back those of a character that never ends
    assert answer["choices"][0]["text"] == transformers_greedy(folder, PROMPT, 8)[1].rstrip("\ufffd")


def test_gguf_export_takes_a_byte_level_llama_and_refuses_the_rest_in_one_line(checkpoint, capsys, tmp_path):
    import gguf

    folder, name = checkpoint
    code, _, err = run(capsys, "export", folder, "--format", "gguf", "--out", tmp_path / "m.gguf")
    if name.startswith("llama") and name != "llama-rope-scaling":
        assert code == 0, err
        fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
        assert bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0])  # llama.cpp adds the BOS its tokenizer does
    else:
        assert code == 2 and len(err.splitlines()) == 1 and "GGUF export supports" in err


def test_a_tokenizer_that_is_not_byte_level_is_refused_for_gguf(tmp_path, capsys):
    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2, "once": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    LlamaForCausalLM(LlamaConfig(vocab_size=4, **SHAPE)).save_pretrained(tmp_path / "m")
    wrapped.save_pretrained(tmp_path / "m")
    code, _, err = run(capsys, "export", tmp_path / "m", "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert code == 2 and len(err.splitlines()) == 1 and "byte-level BPE" in err


def test_a_hub_id_unreachable_offline_is_one_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "expandlm", "generate", "--model", "nobody/no-such-model"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "nobody/no-such-model: no such model folder, and not downloadable as a hub model id" in result.stderr


def test_a_hub_id_is_downloaded_without_code_or_pickles_and_served(monkeypatch, capsys, tmp_path):
    """The hub path as it runs online, with the download replaced by a copy (no network here): the id goes
    to `snapshot_download` with patterns that fetch config, safetensors and tokenizer files only."""
    import fnmatch
    import huggingface_hub
    folder = tmp_path / "hub-side"
    save_checkpoint(folder, "llama")
    (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append(repo_id)
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir(exist_ok=True)
        for f in folder.iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                (snapshot / f.name).write_bytes(f.read_bytes())
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "generate", "--model", "someone/tiny-model", "--prompt", PROMPT, "--temperature", "0",
                         "--max-new-tokens", "4", "--json")
    assert code == 0, err
    assert asked == ["someone/tiny-model"] and not (tmp_path / "snapshot" / "modeling_evil.py").exists()
    assert json.loads(out)["samples"][0]["text"] == transformers_greedy(folder, PROMPT, 4)[0]


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "Tell me about a cat."},
                {"role": "assistant", "content": "Once upon a time, there was a cat."},
                {"role": "user", "content": "And then?"}]


def greedy_tokens(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after `ids`, whatever they are (no end token stops them)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # the fast engine, and transformers' generate
def chat_checkpoint(request, tmp_path_factory):
    """(folder, answer length): an instruct checkpoint (`save_checkpoint` with CHATML). A random model never
    ends its turn, so its head's rows of <|im_end|> and of a token it first writes third or later are
    swapped: greedily it writes the same tokens up to there, then <|im_end|>."""
    folder = tmp_path_factory.mktemp(f"chat-{request.param}")
    save_checkpoint(folder, request.param, chat_template=CHATML)
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)["input_ids"]
    written = greedy_tokens(model, ids, 12)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    turn = next(i for i in range(2, len(written)) if written[i] not in [*written[:i], end, tok.eos_token_id])
    at = written[turn]
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[[end, at]] = head[[at, end]].clone()
    model.save_pretrained(folder)
    return folder, turn + 1


class RecordingScheduler(Scheduler):
    """The scheduler, keeping the token ids of every sequence it is given."""
    submitted: list

    def submit(self, jobs):
        self.submitted = [*getattr(self, "submitted", []), *(job.ids for job in jobs)]
        super().submit(jobs)


def test_chat_with_an_instruct_checkpoint_is_its_template_and_ends_with_the_turn(chat_checkpoint):
    """As vLLM serves it: every message through the tokenizer's own template, the answer only the assistant's
    words (no prompt echoed), ended by the generation config's end of turn; streamed the same."""
    from fastapi.testclient import TestClient

    folder, length = chat_checkpoint
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=True)["input_ids"]
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=12, pad_token_id=tok.eos_token_id)  # its config's ends stop it
    new = out[0, len(ids):].tolist()
    assert new[-1] == tok.convert_tokens_to_ids("<|im_end|>") and len(new) == length
    expected = tok.decode(new, skip_special_tokens=True).rstrip("\ufffd")
    scheduler = RecordingScheduler(max_batch=2, max_waiting=4, threads=1).start()
    body = {"model": "base", "messages": CONVERSATION, "max_tokens": 12, "temperature": 0}
    try:
        with TestClient(create_app(Catalog([load_served(folder, device="cpu")]), scheduler)) as http:
            answer = http.post("/v1/chat/completions", json=body).json()
            events = http.post("/v1/chat/completions", json={**body, "stream": True}).text.split("\n\n")
    finally:
        scheduler.stop()
    assert scheduler.submitted == [ids, ids]
    choice = answer["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (expected, "stop")
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (len(ids), len(new))
    chunks = [json.loads(e[len("data: "):]) for e in events if e.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_template_that_refuses_the_messages_is_a_400_naming_them(chat_checkpoint):
    from fastapi.testclient import TestClient

    served = load_served(chat_checkpoint[0], device="cpu")
    served.tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    scheduler = Scheduler(max_batch=1, max_waiting=2, threads=1).start()
    try:
        with TestClient(create_app(Catalog([served]), scheduler)) as http:
            answer = http.post("/v1/chat/completions", json={"model": "base", "messages": CONVERSATION})
    finally:
        scheduler.stop()
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == "messages"
    assert error["message"] == "The model's chat template refuses these messages: roles must alternate user/assistant"
