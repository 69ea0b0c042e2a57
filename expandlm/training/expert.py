"""A domain expert end to end: corpus → tokenizer → token shards → model → train → evaluate → checkpoint.

The run folder (`run_folder.py`; its life: `run.py`) holds a standard Hugging Face checkpoint (`AutoModelForCausalLM` /
`AutoTokenizer` load it), the run record, the curves, the model card and the resumable state.
"""
from __future__ import annotations

import dataclasses

from ..config import arg, config
from ..data.corpus import default_data_dir, load_train_val
from ..data.shards import PackedBatches, build_shard
from ..data.tokenizer import load_tokenizer, train_bpe
from ..domains import save_specs
from ..evaluation.bpb import evaluate_bpb
from ..formats.checkpoint import Checkpoint
from ..model.llama import build_model, count_params, get_preset, preset_dict
from ..process import log
from ..records import ModelCard, RunRecord
from .loop import TrainConfig, batch_windows
from .run import Run, domain_source, with_domain_data


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


def train_expert(spec: ExpertSpec, resume: bool = False) -> RunRecord:
    """Train one domain's expert; returns the run record (also written to `out/run.json`)."""
    run = Run(spec, resume, spec.train.progress)
    if resume:
        log(f"resuming {run.folder.path} with its saved configuration")
    run.spec, domain = with_domain_data(run.spec, run.folder)
    spec, preset = run.spec, get_preset(spec.preset)
    if spec.train.context:  # a model trained from scratch is built for its training window
        preset = dataclasses.replace(preset, context=spec.train.context)
    corpus, val_corpus = load_train_val(spec.data, domain, spec.val_data, spec.limit, spec.val_limit)
    with run.dist.main_process_first():  # one process trains the tokenizer and writes the shards
        tokenizer = _tokenizer(run, spec, corpus, domain, preset)
        train_shard = build_shard(corpus, tokenizer, spec.cache_dir)
        val_shard = build_shard(val_corpus, tokenizer, spec.cache_dir)

    model = build_model(preset, tokenizer, seed=spec.train.seed)
    n_params = count_params(model)
    log(f"model: {spec.preset} preset, {n_params:,} parameters (dim {preset.dim}, {preset.layers} layers, "
        f"{preset.heads} heads, vocab {len(tokenizer)}, context {preset.context})")
    log(f"data: {train_shard.meta['documents']:,} documents, {train_shard.meta['tokens']:,} tokens "
        f"({train_shard.meta['bytes'] / train_shard.meta['tokens']:.2f} bytes/token); "
        f"validation {val_shard.meta['documents']:,} documents")
    run.begin(run.new_record("expert", spec.train.seed, {domain.name: domain_source(spec)},
                             total_params=n_params, trainable_params=count_params(model, True),
                             preset=preset_dict(preset), data={"train": train_shard.meta, "validation": val_shard.meta}))
    batches = PackedBatches([train_shard], preset.context, batch_windows(spec.train, preset.context), spec.train.seed)
    model, state = run.train(model, batches, val_shard=val_shard)

    def measure() -> dict:
        log(f"evaluating on {val_shard.meta['documents']:,} validation documents")
        final = evaluate_bpb(model, val_shard, context=preset.context)
        log(f"{domain.name}: val bpb {final['bpb']:.4f} after {state.tokens:,} tokens in {state.elapsed_s / 60:.1f} min "
            f"→ {run.folder.path}")
        return {"bpb": {domain.name: final["bpb"]}, "val": final}

    return run.finish(model, Checkpoint(), ModelCard(domains=[domain.name], method="scratch", preset=spec.preset),
                      state, measure)


def _tokenizer(run: Run, spec: ExpertSpec, corpus, domain, preset):
    """The expert's tokenizer: the one saved in its folder (a resume, or another process's), a given one,
    or a byte-level BPE trained on its corpus."""
    if run.resume or not run.is_main:
        return load_tokenizer(run.folder.path)
    if spec.tokenizer:
        tokenizer = load_tokenizer(spec.tokenizer, default_data_dir(), [domain.tag])
    else:
        log(f"training a {spec.vocab_size or preset.vocab}-token byte-level BPE on {len(corpus.documents)} documents")
        tokenizer = train_bpe(corpus.documents, spec.vocab_size or preset.vocab, [domain.tag])
    run.folder.save(tokenizer.save_pretrained)
    save_specs(run.folder.path, [domain])
    return tokenizer
