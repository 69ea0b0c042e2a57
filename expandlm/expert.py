"""A domain expert end to end: corpus → tokenizer → token shards → model → train → evaluate → checkpoint.

The output folder is a standard Hugging Face checkpoint (`AutoModelForCausalLM` / `AutoTokenizer`
load it), plus `run.json` (config, seed, versions, data, metrics), `metrics.jsonl` (the curves),
`expandlm.json` (which domains the model serves) and `checkpoint/` (the resumable training state).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .artifacts import move_files_into, read_json, versions, write_json_atomic
from .corpus import default_data_dir, load_train_val
from .domains import get_domain
from .errors import UserError
from .evaluate import evaluate_bpb
from .serving import MODEL_CARD
from .model import build_model, count_params, get_preset, preset_dict
from .shards import PackedBatches, build_shard
from .tokenizer import load_tokenizer, train_bpe
from .train import CHECKPOINT, TrainConfig, clear_run, distributed_state, train

RUN_RECORD = "run.json"


@dataclass
class ExpertSpec:
    domain: str
    data: str
    out: str
    preset: str = "tiny"
    tokenizer: str | None = None      # a saved tokenizer folder, `gpt2` or `bytes`; None: train a BPE
    vocab_size: int | None = None     # for the trained BPE; default: the preset's
    val_data: str | None = None       # default: hold out 1% of the training documents
    limit: int | None = None          # use only the first N training documents
    val_limit: int | None = None      # use only the first N validation documents
    cache_dir: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


def log(*args) -> None:
    if distributed_state().is_main_process:
        print(*args, flush=True)


def check_out(out: Path, resume: bool) -> None:
    if resume:
        if not (out / CHECKPOINT / "train_state.json").exists():
            raise UserError(f"{out}: nothing to resume (no {CHECKPOINT}/ from an earlier run); drop --resume")
    elif (out / CHECKPOINT).exists() or (out / RUN_RECORD).exists():
        raise UserError(f"{out}: already holds a run; pass --resume to continue it, or choose another --out")


def spec_from_record(out: Path, spec_cls, progress: bool = True):
    """The spec a run was started with: a resumed run continues with exactly that (only the progress
    bar follows the new command line)."""
    saved = read_json(out / RUN_RECORD, "run record")["spec"]
    train_cfg = TrainConfig(**{**saved["train"], "betas": tuple(saved["train"]["betas"]), "progress": progress})
    return spec_cls(**{**saved, "train": train_cfg})


def train_expert(spec: ExpertSpec, resume: bool = False) -> dict:
    """Train one domain's expert; returns the run record (also written to `out/run.json`)."""
    out = Path(spec.out)
    check_out(out, resume)
    if resume:
        spec = spec_from_record(out, ExpertSpec, spec.train.progress)
        log(f"resuming {out} with its saved configuration")
    dist = distributed_state()
    domain, preset = get_domain(spec.domain), get_preset(spec.preset)
    t0 = time.time()
    corpus, val_corpus = load_train_val(spec.data, domain, spec.val_data, spec.limit, spec.val_limit)
    if not resume and dist.is_main_process:
        clear_run(out)
    with dist.main_process_first():  # one process trains the tokenizer and writes the shards
        if resume or not dist.is_main_process:
            tokenizer = load_tokenizer(out)
        elif spec.tokenizer:
            tokenizer = load_tokenizer(spec.tokenizer, default_data_dir())
        else:
            log(f"training a {spec.vocab_size or preset.vocab}-token byte-level BPE on {len(corpus.documents)} documents")
            tokenizer = train_bpe(corpus.documents, spec.vocab_size or preset.vocab)
        if dist.is_main_process and not resume:
            save_into(out, tokenizer.save_pretrained)
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
    record = {"kind": "expert", "spec": asdict(spec), "preset": preset_dict(preset), "seed": spec.train.seed,
              "versions": versions(), "params": n_params, "trainable_params": count_params(model, True),
              "data": {"train": train_shard.meta, "validation": val_shard.meta}, "status": "running",
              # where each domain the model serves came from: adapting it later reuses these
              "domain_data": {domain.name: {"train": spec.data, "val": spec.val_data, "limit": spec.limit,
                                            "val_limit": spec.val_limit}}}
    if dist.is_main_process:
        write_json_atomic(out / RUN_RECORD, record if not resume else {**read_json(out / RUN_RECORD), "status": "running"})
    batches = PackedBatches([train_shard], preset.context, spec.train.batch_size, spec.train.seed)
    model, state = train(model, batches, out, spec.train, val_shard=val_shard, resume=resume)

    if dist.is_main_process:
        log(f"evaluating on {val_shard.meta['documents']:,} validation documents")
        final = evaluate_bpb(model, val_shard)
        save_into(out, model.save_pretrained)
        write_json_atomic(out / MODEL_CARD, {"domains": [domain.name], "strategy": "scratch", "preset": spec.preset})
        record.update(status="done", steps=state.step, tokens=state.tokens, train_seconds=round(state.elapsed_s, 1),
                      resumed_from=state.resumed_from,
                      prep_seconds=round(prep_s, 1), val=final, val_bpb=final["bpb"])
        write_json_atomic(out / RUN_RECORD, record)
        log(f"{domain.name}: val bpb {final['bpb']:.4f} after {state.tokens:,} tokens in {state.elapsed_s / 60:.1f} min "
            f"→ {out}")
    dist.wait_for_everyone()
    return record


def save_into(out: Path, save_fn) -> None:
    """Run a `save_pretrained` into a temp folder beside `out`, then move each file in atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    save_fn(tmp)
    move_files_into(tmp, out)
