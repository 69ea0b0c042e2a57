"""Adapting a trained model to a new domain with a strategy (design.md §5): old expert → new model.

The output folder serves every old domain and the new one: a standard checkpoint (or a PEFT adapter
for `lora`), `expandlm.json` saying how each domain runs, `run.json` with config, seed, versions and
bpb on every domain before and after, and the resumable `checkpoint/`.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .artifacts import move_files_into, read_json, versions, write_json_atomic
from .corpus import load_train_val
from .domains import get_domain
from .errors import UserError
from .evaluate import evaluate_bpb
from .expert import RUN_RECORD, check_out, log, save_into, spec_from_record
from .model import count_params
from .serving import MODEL_CARD, load_served, restore_all_layers, select_domain
from .shards import PackedBatches, build_shard
from .strategies import AdaptContext, make_strategy
from .tokenizer import load_tokenizer
from .train import TrainConfig, clear_run, train
from .vocab import expand_tokenizer, grow_embeddings, train_only_new_rows

KEEP_TEXTS = 2000  # old-domain documents whose tokenization vocabulary expansion must keep exactly


@dataclass
class AdaptSpec:
    base: str                      # the model folder to adapt (an expert, or an earlier adapted model)
    strategy: str
    domain: str                    # the new domain
    data: str
    out: str
    options: dict = field(default_factory=dict)  # the strategy's own options
    val_data: str | None = None
    expand_vocab: int = 0          # > 0: append this many tokens learned from the new domain
    limit: int | None = None
    val_limit: int | None = None
    cache_dir: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


def adapt(spec: AdaptSpec, resume: bool = False) -> dict:
    out = Path(spec.out)
    check_out(out, resume)
    if resume:
        spec = spec_from_record(out, AdaptSpec, spec.train.progress)
    strategy = make_strategy(spec.strategy, spec.options)
    base_dir = Path(spec.base)
    served = load_served(base_dir)
    if "adapter" in served.card or "paths" in served.card:
        raise UserError(f"{base_dir}: adapting a {served.card['strategy']} model again is not supported yet; "
                        "adapt an expert or a model with one set of weights")
    base_record = read_json(base_dir / RUN_RECORD, "run record")
    old_data = base_record.get("domain_data", {})
    domain = get_domain(spec.domain)
    old_domains = served.domains or list(old_data)
    if domain.name in old_domains:
        raise UserError(f"{base_dir} already serves '{domain.name}'; adapt it to a domain it does not serve")
    missing = [d for d in old_domains if d not in old_data]
    if missing:
        raise UserError(f"{base_dir / RUN_RECORD}: field 'domain_data' has no entry for {', '.join(missing)}")
    t0 = time.time()
    new_train, new_val = load_train_val(spec.data, domain, spec.val_data, spec.limit, spec.val_limit)
    old_corpora = {d: load_train_val(old_data[d]["train"], get_domain(d), old_data[d]["val"], old_data[d]["limit"],
                                     old_data[d].get("val_limit"))
                   for d in old_domains}

    tokenizer, base_vocab = served.tokenizer, len(served.tokenizer)
    if resume:
        tokenizer = load_tokenizer(out)
    elif spec.expand_vocab:
        keep = [doc for train_c, _ in old_corpora.values() for doc in train_c.documents[:KEEP_TEXTS]]
        tokenizer = expand_tokenizer(served.tokenizer, new_train.documents, spec.expand_vocab, keep_texts=keep)
        log(f"vocabulary: {base_vocab} → {len(tokenizer)} tokens ({len(tokenizer) - base_vocab} from {domain.name})")
    if not resume:
        clear_run(out)
        save_into(out, tokenizer.save_pretrained)
    new_shard = build_shard(new_train, tokenizer, spec.cache_dir)
    val_shards = {domain.name: build_shard(new_val, tokenizer, spec.cache_dir)}
    old_shards = {}
    for d, (train_c, val_c) in old_corpora.items():
        old_shards[d] = build_shard(train_c, tokenizer, spec.cache_dir)
        val_shards[d] = build_shard(val_c, tokenizer, spec.cache_dir)

    model = served.model
    model.train()
    if len(tokenizer) > base_vocab:
        grow_embeddings(model, len(tokenizer))
    ctx = AdaptContext(base_dir=base_dir, old_domains=old_domains, new_domain=domain, new_shard=new_shard,
                       old_shards=old_shards, tokenizer=tokenizer, base_vocab=base_vocab,
                       preset=base_record["spec"].get("preset", "tiny"), seed=spec.train.seed)
    built = strategy.build(model, ctx)
    frozen_rows = 0
    if len(tokenizer) > base_vocab and built is model:
        if spec.strategy == "lora":
            raise UserError("expand_vocab is not supported with the lora strategy yet")
        train_only_new_rows(built, base_vocab)
        frozen_rows = base_vocab * built.config.hidden_size
    trainable = count_params(built, trainable_only=True) - frozen_rows
    total = count_params(built)
    log(f"strategy {strategy.name}: {trainable:,} of {total:,} parameters trainable")
    mixture = strategy.mixture(ctx)
    context = built.config.max_position_embeddings
    weights = [w for _, w in mixture] if len(mixture) > 1 else None
    batches = PackedBatches([s for s, _ in mixture], context, spec.train.batch_size, spec.train.seed, weights)
    card = {**strategy.card(ctx), "base": os.path.relpath(base_dir.resolve(), out.resolve()),
            "vocab": {"base": base_vocab, "size": len(tokenizer)}}
    record = {"kind": "adapt", "spec": asdict(spec), "seed": spec.train.seed, "versions": versions(),
              "strategy": strategy.name, "card": card, "trainable_params": trainable, "total_params": total,
              "domain_data": {**{d: old_data[d] for d in old_domains},
                              domain.name: {"train": spec.data, "val": spec.val_data, "limit": spec.limit,
                                            "val_limit": spec.val_limit}},
              "status": "running"}
    write_json_atomic(out / RUN_RECORD, record)
    prep_s = time.time() - t0

    trained, state = train(built, batches, out, spec.train, val_shard=val_shards[domain.name],
                           loss_fn=strategy.loss, resume=resume)
    bpb = {}
    for d, shard in val_shards.items():
        bpb[d] = evaluate_bpb(select_domain(trained, card, d), shard)["bpb"]
    restore_all_layers(trained)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    strategy.save(trained, tmp)
    move_files_into(tmp, out)
    write_json_atomic(out / MODEL_CARD, card)
    before = {d: base_record.get("bpb", {}).get(d, base_record.get("val_bpb")) for d in old_domains}
    record.update(status="done", steps=state.step, tokens=state.tokens, train_seconds=round(state.elapsed_s, 1),
                  prep_seconds=round(prep_s, 1), resumed_from=state.resumed_from, bpb=bpb, bpb_before=before,
                  forgetting={d: bpb[d] - before[d] for d in old_domains if before[d] is not None})
    write_json_atomic(out / RUN_RECORD, record)
    log(f"{strategy.name}: bpb " + ", ".join(f"{d} {v:.4f}" for d, v in bpb.items()) + f" → {out}")
    return record

