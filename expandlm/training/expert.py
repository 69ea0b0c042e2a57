"""A domain expert end to end: corpus → tokenizer → token shards → model → train → evaluate → checkpoint.

The run folder (`run_folder.py`) holds a standard Hugging Face checkpoint (`AutoModelForCausalLM` /
`AutoTokenizer` load it), the run record, the curves, the model card and the resumable state.
"""
from __future__ import annotations

import dataclasses
import time

from ..config import arg, build, config, path_fields
from ..data.corpus import default_data_dir, load_train_val
from ..process import distributed_state
from ..domains import get_domain, load_folder_specs, save_specs
from ..evaluation.bpb import evaluate_bpb
from ..model.llama import build_model, count_params, get_preset, preset_dict
from ..records import ModelCard
from ..run_folder import RunFolder
from ..data.shards import PackedBatches, build_shard
from ..data.tokenizer import load_tokenizer, train_bpe
from .loop import TrainConfig, train


@config
class ExpertSpec:
    domain: str = arg(help="the domain to train on: a name, or the path of a domain spec (YAML)")
    out: str = arg(help="the run folder to write", path=True)
    data: str | None = arg(None, "training corpus: a .jsonl(.gz), .txt, .parquet file or a hub dataset id "
                           "(default: the domain spec's training file)", path=True)
    preset: str = arg("tiny", "model size: nano | tiny | small | base")
    tokenizer: str | None = arg(None, "a tokenizer folder, or gpt2 / bytes (default: train a BPE on --data)", path=True)
    vocab_size: int | None = arg(None, "vocabulary of the trained BPE (default: the preset's)")
    val_data: str | None = arg(None, "validation corpus (default: hold out 1% of --data)", path=True)
    limit: int | None = arg(None, "use only the first N training documents")
    val_limit: int | None = arg(None, "use only the first N validation documents")
    cache_dir: str | None = arg(None, "token shard cache (default: $EXPANDLM_CACHE or ~/.cache/expandlm)", path=True)
    train: TrainConfig = arg(help="training loop settings", factory=TrainConfig)


def log(*args) -> None:
    if distributed_state().is_main_process:
        print(*args, flush=True)


def stored_spec(spec, folder: RunFolder) -> dict:
    """A spec as a run record stores it: paths relative to the run folder."""
    data = dataclasses.asdict(spec)
    for name in path_fields(type(spec)):
        data[name] = folder.portable(data[name]) if name != "out" else "."
    return data


def saved_spec(folder: RunFolder, spec_cls, progress: bool = True):
    """The spec a run was started with, its paths usable from here: a resumed run continues with
    exactly that (only the progress bar follows the new command line)."""
    data = dict(folder.record()["spec"])
    for name in path_fields(spec_cls):
        data[name] = folder.resolve(data[name]) if name != "out" else str(folder.path)
    data["train"] = {**data["train"], "progress": progress}
    return build(spec_cls, data, f"{folder / 'run.json'}: spec")


def with_domain_data(spec, folder: RunFolder):
    """The spec with its domain by name (a spec file is read once; the run folder keeps it, so a resumed
    run knows the domain) and its corpus: `--data` when given, else the files the domain's spec names (a
    built-in domain's under the data folder); the validation file follows the same choice."""
    load_folder_specs(folder.path)
    domain = get_domain(spec.domain)
    spec = dataclasses.replace(spec, domain=domain.name)
    if spec.data is not None:
        return spec
    train, valid = domain.local_files(default_data_dir())
    return dataclasses.replace(spec, data=train, val_data=spec.val_data or valid)


def domain_source(spec, folder: RunFolder) -> dict:
    """Where a domain's data came from, for the record (adapting and routing reuse it)."""
    return {"train": folder.portable(spec.data), "val": folder.portable(spec.val_data), "limit": spec.limit,
            "val_limit": spec.val_limit}


def train_expert(spec: ExpertSpec, resume: bool = False) -> dict:
    """Train one domain's expert; returns the run record (also written to `out/run.json`)."""
    folder = RunFolder(spec.out)
    folder.begin(resume)
    if resume:
        spec = saved_spec(folder, ExpertSpec, spec.train.progress)
        log(f"resuming {folder.path} with its saved configuration")
    dist = distributed_state()
    spec = with_domain_data(spec, folder)
    domain, preset = get_domain(spec.domain), get_preset(spec.preset)
    t0 = time.time()
    corpus, val_corpus = load_train_val(spec.data, domain, spec.val_data, spec.limit, spec.val_limit)
    with dist.main_process_first():  # one process trains the tokenizer and writes the shards
        if resume or not dist.is_main_process:
            tokenizer = load_tokenizer(folder.path)
        elif spec.tokenizer:
            tokenizer = load_tokenizer(spec.tokenizer, default_data_dir(), [domain.tag])
        else:
            log(f"training a {spec.vocab_size or preset.vocab}-token byte-level BPE on {len(corpus.documents)} documents")
            tokenizer = train_bpe(corpus.documents, spec.vocab_size or preset.vocab, [domain.tag])
        if not resume:
            folder.save(tokenizer.save_pretrained)
            save_specs(folder.path, [domain.name])
        train_shard = build_shard(corpus, tokenizer, spec.cache_dir)
        val_shard = build_shard(val_corpus, tokenizer, spec.cache_dir)
    prep_s = time.time() - t0

    model = build_model(preset, tokenizer, seed=spec.train.seed)
    n_params = count_params(model)
    log(f"model: {spec.preset} preset, {n_params:,} parameters (dim {preset.dim}, {preset.layers} layers, "
        f"{preset.heads} heads, vocab {len(tokenizer)}, context {preset.context})")
    log(f"data: {train_shard.meta['documents']:,} documents, {train_shard.meta['tokens']:,} tokens "
        f"({train_shard.meta['bytes'] / train_shard.meta['tokens']:.2f} bytes/token); "
        f"validation {val_shard.meta['documents']:,} documents")
    record = folder.new_record(
        "expert", stored_spec(spec, folder), spec.train.seed, preset=preset_dict(preset), params=n_params,
        trainable_params=count_params(model, True), data={"train": train_shard.meta, "validation": val_shard.meta},
        domain_data={domain.name: domain_source(spec, folder)})
    if resume:
        record = {**folder.record(), "status": "running"}
    folder.write_record(record)
    batches = PackedBatches([train_shard], preset.context, spec.train.batch_size, spec.train.seed)
    model, state = train(model, batches, folder, spec.train, val_shard=val_shard, resume=resume)

    if dist.is_main_process:
        log(f"evaluating on {val_shard.meta['documents']:,} validation documents")
        final = evaluate_bpb(model, val_shard)
        folder.save(model.save_pretrained)
        folder.write_card(ModelCard(domains=[domain.name], method="scratch", preset=spec.preset))
        record.update(status="done", steps=state.step, tokens=state.tokens, train_seconds=round(state.elapsed_s, 1),
                      resumed_from=state.resumed_from, prep_seconds=round(prep_s, 1), val=final,
                      val_bpb=final["bpb"], bpb={domain.name: final["bpb"]})
        folder.write_record(record)
        log(f"{domain.name}: val bpb {final['bpb']:.4f} after {state.tokens:,} tokens in {state.elapsed_s / 60:.1f} min "
            f"→ {folder.path}")
    dist.wait_for_everyone()
    return record
