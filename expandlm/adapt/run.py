"""`expandlm adapt`: a trained model taught a new domain with a training method: old model → new model.

The run folder serves every old domain and the new one, in the format the method produces (`formats/`):
`expandlm.json` names format and method, `run.json` holds config, seed, versions and bpb on every
domain before and after, and `checkpoint/` the resumable state.
"""
from __future__ import annotations

import dataclasses
import functools
import time

from ..config import arg, config
from ..data.corpus import load_train_val
from ..domains import get_domain, save_specs
from ..process import distributed_state
from ..errors import UserError
from ..evaluation.bpb import evaluate_bpb
from ..training.expert import domain_source, log, saved_spec, stored_spec, with_domain_data
from ..model.llama import count_params
from ..run_folder import RUN_RECORD, RunFolder
from ..formats.served import load_served
from ..data.shards import PackedBatches, build_shard
from ..formats import FORMATS
from ..records import ModelCard
from . import DEFAULT_METHOD, METHODS, AdaptContext, make_method
from ..data.tokenizer import load_tokenizer
from ..training.loop import TrainConfig, planned_tokens, step_tokens, train
from ..data.vocab import expand_tokenizer, grow_embeddings, train_only_new_rows, with_tag

KEEP_TEXTS = 2000  # old-domain documents whose tokenization vocabulary expansion must keep exactly


@config
class AdaptSpec:
    base: str = arg(help="the model folder to adapt (an expert from `train`, or an adapted model)", path=True)
    domain: str = arg(help="the new domain: a name, or the path of a domain spec (YAML)")
    out: str = arg(help="the run folder to write", path=True)
    data: str | None = arg(None, "the new domain's training corpus: a file or hub dataset id (default: the domain "
                           "spec's training file)", path=True)
    strategy: str = arg(DEFAULT_METHOD, "expand_branch | expand_paths | expand | lora | replay | ewc | joint | full_ft")
    options: dict = arg(help="the strategy's own options (--option KEY=VALUE, repeatable)", factory=dict, flag=False)
    val_data: str | None = arg(None, "validation corpus (default: hold out 1% of --data)", path=True)
    expand_vocab: int = arg(0, "append N tokens learned from the new domain (old tokenization kept)")
    limit: int | None = arg(None, "use only the first N training documents")
    val_limit: int | None = arg(None, "use only the first N validation documents")
    cache_dir: str | None = arg(None, "token shard cache (default: $EXPANDLM_CACHE or ~/.cache/expandlm)", path=True)
    train: TrainConfig = arg(help="training loop settings", factory=TrainConfig)


def adapt(spec: AdaptSpec, resume: bool = False) -> dict:
    folder = RunFolder(spec.out)
    folder.begin(resume)
    if resume:
        spec = saved_spec(folder, AdaptSpec, spec.train.progress)
    dist = distributed_state()
    spec = with_domain_data(spec, folder)
    method = make_method(spec.strategy, spec.options)
    fmt = FORMATS[method.format]()
    if spec.expand_vocab and not method.supports_vocab_expansion:
        raise UserError(f"--expand-vocab is not supported by the {method.name} strategy")
    served = load_served(spec.base, device="cpu")  # accelerate places the model for training
    base_folder = served.folder
    old_data = served.domain_data()
    domain = get_domain(spec.domain)
    old_domains = served.domains or list(old_data)
    if domain.name in old_domains:
        raise UserError(f"{base_folder.path} already serves '{domain.name}'; adapt it to a domain it does not serve")
    if fmt.serves_old_from_base:  # the new domain grows from the trunk: the base's first domain's model
        model, base_tokenizer = served.export_model(old_domains[0]), served.tokenizer_for(old_domains[0])
    elif served.format.one_set_of_weights:
        model, base_tokenizer = served.model, served.tokenizer
    else:
        able = [n for n, cls in METHODS.items() if FORMATS[cls.format].serves_old_from_base]
        raise UserError(f"{base_folder.path}: adapting a {served.card.method} model again is not supported by the "
                        f"{method.name} strategy (no one set of weights serves all its domains); adapt it with "
                        f"{' or '.join(able)}, which leaves its domains to it, or adapt a model with one set of weights")
    missing = [d for d in old_domains if d not in old_data]
    if missing:
        raise UserError(f"{base_folder / RUN_RECORD}: field 'domain_data' has no entry for {', '.join(missing)}")
    base_record = base_folder.record()
    t0 = time.time()
    new_train, new_val = load_train_val(spec.data, domain, spec.val_data, spec.limit, spec.val_limit)
    old_corpora = {d: load_train_val(old_data[d]["train"], get_domain(d), old_data[d]["val"], old_data[d]["limit"],
                                     old_data[d].get("val_limit"))
                   for d in old_domains}

    base_vocab = len(base_tokenizer)
    tokenizer = base_tokenizer  # the new domain's: the old one, grown, or (own_tokenizer) a new one
    # a domain the old tokenizer was not trained for (a user's, or code on an older model) needs its tag
    needs_tag = not method.own_tokenizer and not spec.expand_vocab and domain.tag not in base_tokenizer.get_vocab()
    if needs_tag and method.keeps_old_domains:
        raise UserError(f"{base_folder.path}: its tokenizer has no tag {domain.tag}, and {method.name} keeps the old "
                        "domains bit-identical only over the old vocabulary; adapt with expand_branch (the default: "
                        f"{domain.name} gets a tokenizer of its own) or with --expand-vocab N")
    with dist.main_process_first():  # one process writes the tokenizer and the shards
        if resume or not dist.is_main_process and (spec.expand_vocab or method.own_tokenizer or needs_tag):
            tokenizer = load_tokenizer(folder.path)
        elif method.own_tokenizer:
            tokenizer = method.new_tokenizer(new_train.documents, base_tokenizer, domain)
            log(f"tokenizer: {len(tokenizer)} tokens of {domain.name}'s own (the old domains keep theirs)")
        elif spec.expand_vocab:
            keep = [doc for train_c, _ in old_corpora.values() for doc in train_c.documents[:KEEP_TEXTS]]
            tokenizer = expand_tokenizer(base_tokenizer, new_train.documents, spec.expand_vocab, keep_texts=keep)
            log(f"vocabulary: {base_vocab} → {len(tokenizer)} tokens ({len(tokenizer) - base_vocab} from {domain.name})")
        elif needs_tag:
            tokenizer = with_tag(base_tokenizer, domain.tag)
            log(f"vocabulary: {domain.tag} appended ({base_vocab} → {len(tokenizer)} tokens)")
        if not resume:
            folder.save(tokenizer.save_pretrained)
            save_specs(folder.path, [*old_domains, domain.name])
        old_tokenizer = base_tokenizer if method.own_tokenizer else tokenizer
        new_shard = build_shard(new_train, tokenizer, spec.cache_dir)
        val_shards = {domain.name: build_shard(new_val, tokenizer, spec.cache_dir)}
        old_shards = {}
        for d, (train_c, val_c) in old_corpora.items():  # each old domain's text as it will be served
            tok = served.tokenizer_for(d) if fmt.serves_old_from_base else old_tokenizer
            old_shards[d] = build_shard(train_c, tok, spec.cache_dir)
            val_shards[d] = build_shard(val_c, tok, spec.cache_dir)

    model.train()
    if spec.expand_vocab or needs_tag:
        grow_embeddings(model, len(tokenizer))
    ctx = AdaptContext(old_domains=old_domains, new_domain=domain, new_shard=new_shard, old_shards=old_shards,
                       tokenizer=tokenizer, old_tokenizer=old_tokenizer, base_vocab=base_vocab, preset=served.card.preset or "tiny",
                       seed=spec.train.seed)
    mixture = method.mixture(ctx)
    context = model.config.max_position_embeddings
    weights = [w for _, w in mixture] if len(mixture) > 1 else None
    batches = PackedBatches([s for s, _ in mixture], context, spec.train.batch_size, spec.train.seed, weights)
    ctx.budget_tokens = planned_tokens(spec.train, step_tokens(spec.train, batches, dist.num_processes),
                                       batches.tokens_per_epoch)
    adapted = method.build(model, ctx)
    frozen_rows = 0
    if spec.expand_vocab and adapted.model is model:
        train_only_new_rows(adapted.model, base_vocab)
        frozen_rows = base_vocab * adapted.model.config.hidden_size
    trainable = count_params(adapted.model, trainable_only=True) - frozen_rows
    total = count_params(adapted.model)
    log(f"strategy {method.name}: {trainable:,} of {total:,} parameters trainable")
    card = ModelCard(domains=ctx.domains, format=method.format, method=method.name,
                     options=dataclasses.asdict(method.options), base=folder.portable(base_folder.path),
                     preset=ctx.preset, vocab={"base": base_vocab, "size": len(tokenizer)},
                     details=method.card(adapted, ctx))
    record = folder.new_record(
        "adapt", stored_spec(spec, folder), spec.train.seed, strategy=method.name, card=card.to_json(),
        trainable_params=trainable, total_params=total,
        domain_data={**{d: {**old_data[d], "train": folder.portable(old_data[d]["train"]),
                            "val": folder.portable(old_data[d]["val"])} for d in old_domains},
                     domain.name: domain_source(spec, folder)})
    if resume:
        record = {**folder.record(), "status": "running"}
    folder.write_record(record)
    prep_s = time.time() - t0

    trained, state = train(adapted.model, batches, folder, spec.train, val_shard=val_shards[domain.name],
                           loss_fn=functools.partial(method.loss, adapted), resume=resume)
    if dist.is_main_process:
        fmt.save(trained, folder)
        folder.write_card(card)
        served = load_served(folder.path)  # exactly what users of the folder will get
        bpb = {d: evaluate_bpb(served.for_domain(d), shard)["bpb"] for d, shard in val_shards.items()}
        before = {d: base_record.get("bpb", {}).get(d, base_record.get("val_bpb")) for d in old_domains}
        record.update(status="done", steps=state.step, tokens=state.tokens, train_seconds=round(state.elapsed_s, 1),
                      prep_seconds=round(prep_s, 1), resumed_from=state.resumed_from, bpb=bpb, bpb_before=before,
                      forgetting={d: bpb[d] - before[d] for d in old_domains if before[d] is not None})
        folder.write_record(record)
        log(f"{method.name}: bpb " + ", ".join(f"{d} {v:.4f}" for d, v in bpb.items()) + f" → {folder.path}")
    dist.wait_for_everyone()
    return record

