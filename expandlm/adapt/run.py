"""`expandlm adapt`: a trained model taught a new domain with a training method: old model → new model.

The run folder serves every old domain and the new one, in the format the method produces (`formats/`):
`expandlm.json` names format and method, `run.json` holds config, seed, versions and bpb on every
domain before and after, and `checkpoint/` the resumable state.
"""
from __future__ import annotations

import dataclasses
import functools

from ..config import arg, config
from ..data.corpus import load_train_val
from ..data.shards import PackedBatches, build_shard
from ..data.tokenizer import load_tokenizer
from ..data.vocab import expand_tokenizer, grow_embeddings, train_only_new_rows, with_tag
from ..domains import save_specs
from ..errors import UserError
from ..evaluation.bpb import evaluate_bpb
from ..formats import FORMATS
from ..formats.checkpoint import BASE_DOMAIN
from ..formats.served import load_served
from ..model.llama import count_params
from ..model.window import window
from ..process import log
from ..records import DomainSource, ModelCard, RunRecord
from ..run_folder import RUN_RECORD
from ..training.loop import TrainConfig, batch_windows, planned_tokens, step_tokens
from ..training.run import Run, domain_source, with_domain_data
from . import DEFAULT_METHOD, METHODS, AdaptContext, make_method

KEEP_TEXTS = 2000  # old-domain documents whose tokenization vocabulary expansion must keep exactly


@config
class AdaptSpec:
    base: str = arg(help="the model folder to adapt (an expert from `train`, an adapted model, or any checkpoint "
                    "transformers saved)", path=True)
    domain: str = arg(help="the new domain: a name, or the path of a domain spec (YAML)")
    out: str = arg(help="the run folder to write", path=True)
    data: str | None = arg(None, "the new domain's training corpus: a file or hub dataset id (default: the domain "
                           "spec's training file)", path=True)
    method: str = arg(DEFAULT_METHOD, "expand_branch | expand_paths | expand | lora | replay | ewc | joint | full_ft",
                      aliases=("strategy",))
    options: dict = arg(help="the method's own options (--option KEY=VALUE, repeatable)", factory=dict, flag=False)
    val_data: str | None = arg(None, "validation corpus (default: hold out 1% of --data)", path=True)
    base_domain: str = arg(BASE_DOMAIN, "the name of a checkpoint's own domain when --base has no expandlm.json")
    base_data: str | None = arg(None, "text of that checkpoint's own domain (any corpus format; --limit and "
                                "--val-limit apply): replay, joint and ewc train on it; every method then measures "
                                "its bpb before and after", path=True)
    expand_vocab: int = arg(0, "append N tokens learned from the new domain (old tokenization kept)")
    limit: int | None = arg(None, "use only the first N training documents")
    val_limit: int | None = arg(None, "use only the first N validation documents")
    cache_dir: str | None = arg(None, "token shard cache (default: $EXPANDLM_CACHE or ~/.cache/expandlm)", path=True)
    train: TrainConfig = arg(help="training loop settings", factory=TrainConfig)


def adapt(spec: AdaptSpec, resume: bool = False) -> RunRecord:
    """Teach `spec.base` the new domain; returns the run record (also `out/run.json`)."""
    run = Run(spec, resume, spec.train.progress)
    run.spec, domain = with_domain_data(run.spec, run.folder)
    spec = run.spec
    method = make_method(spec.method, spec.options)
    fmt = FORMATS[method.format]()
    if spec.expand_vocab and not method.supports_vocab_expansion:
        raise UserError(f"--expand-vocab is not supported by the {method.name} method")
    opened = {}  # the base, as the saved folder opens it again to be measured
    served = load_served(spec.base, device="cpu", base_domain=spec.base_domain, opened=opened)  # accelerate places it
    old_domains, old_data = _old_domains(served, domain, method, spec)
    domain = _new_domain(served, method, domain)
    model, base_tokenizer = _starting_model(served, method, fmt, old_domains)
    _tokens_without_rows(served, model, base_tokenizer)
    new_train, new_val = load_train_val(spec.data, domain, spec.val_data, spec.limit, spec.val_limit)
    old_corpora = {d: load_train_val(old_data[d].train, served.domain(d), old_data[d].val, old_data[d].limit,
                                     old_data[d].val_limit) for d in old_domains if d in old_data}
    needs_tag = _needs_tag(served, method, spec, base_tokenizer, domain)
    with run.dist.main_process_first():  # one process writes the tokenizer and the shards
        tokenizer = _tokenizer(run, method, base_tokenizer, domain, new_train, old_corpora, needs_tag,
                               served.domain(old_domains[0]))
        if not resume:
            run.folder.save(tokenizer.save_pretrained)
            save_specs(run.folder.path, [*map(served.domain, old_domains), domain])
        if tokenizer is not base_tokenizer:  # train on the text as the folder serves it (see `load_tokenizer`)
            tokenizer = load_tokenizer(run.folder.path, model_config=model.config)
        old_tokenizer = base_tokenizer if method.own_tokenizer else tokenizer
        new_shard = build_shard(new_train, tokenizer, spec.cache_dir)
        val_shards = {domain.name: build_shard(new_val, tokenizer, spec.cache_dir)}
        old_shards = {}
        for d, (train_c, val_c) in old_corpora.items():  # each old domain's text as it will be served
            tok = served.tokenizer_for(d) if fmt.serves_old_from_base else old_tokenizer
            old_shards[d] = build_shard(train_c, tok, spec.cache_dir)
            val_shards[d] = build_shard(val_c, tok, spec.cache_dir)

    before = _bpb_before(served, val_shards, spec.train.context)
    model.train()
    if spec.expand_vocab or needs_tag:
        grow_embeddings(model, len(tokenizer), first_new=len(base_tokenizer))
    ctx = AdaptContext(old_domains=old_domains, new_domain=domain, new_shard=new_shard, old_shards=old_shards,
                       tokenizer=tokenizer, old_tokenizer=old_tokenizer, base_vocab=len(base_tokenizer),
                       preset=served.card.preset if served.card.plain else served.card.preset or "tiny",
                       seed=spec.train.seed, context=spec.train.context)  # a checkpoint expandlm did not train has no preset
    mixture = method.mixture(ctx)
    weights = [w for _, w in mixture] if len(mixture) > 1 else None
    context = window(model.config.max_position_embeddings, ctx.context)
    batches = PackedBatches([s for s, _ in mixture], context, batch_windows(spec.train, context), spec.train.seed,
                            weights)
    ctx.budget_tokens = planned_tokens(spec.train, step_tokens(spec.train, batches, run.dist.num_processes),
                                       batches.tokens_per_epoch)
    adapted = method.build(model, ctx)
    card = ModelCard(domains=ctx.domains, plain=[*served.card.plain, *[domain.name] * domain.plain],
                     format=method.format, method=method.name, options=dataclasses.asdict(method.options),
                     base=run.folder.portable(served.source), preset=ctx.preset,
                     vocab={"base": ctx.base_vocab, "size": len(tokenizer)},
                     details={**method.card(adapted, ctx), **served.reference()})
    trainable, total = _parameters(adapted, spec, model, ctx.base_vocab)
    log(f"method {method.name}: {trainable:,} of {total:,} parameters trainable")
    run.begin(run.new_record("adapt", spec.train.seed, {**{d: old_data[d] for d in old_domains if d in old_data},
                                                          domain.name: domain_source(spec)},
                             strategy=method.name, card=card.to_json(), trainable_params=trainable, total_params=total))
    trained, state = run.train(adapted.model, batches, val_shard=val_shards[domain.name],
                               loss_fn=functools.partial(method.loss, adapted))
    kept = opened if fmt.serves_old_from_base else None  # a base left untouched (others may train it in place)
    return run.finish(trained, fmt, card, state, lambda: _measure(run.folder, method, val_shards, before, old_domains,
                                                                  kept, spec.train.context), start=model)


def _old_domains(served, domain, method, spec) -> tuple[list[str], dict]:
    """The domains the base serves, and where each one's data is (its run record says; a plain domain, a
    checkpoint's that expandlm did not train, has none unless --base-data gives it)."""
    old_data = served.domain_data()
    old_domains = served.domains or list(old_data)
    if domain.name in old_domains:
        raise UserError(f"{served.path} already serves '{domain.name}'; adapt it to a domain it does not serve")
    missing = [d for d in old_domains if d not in old_data and d not in served.card.plain]
    if missing:
        raise UserError(f"{served.folder / RUN_RECORD}: field 'domain_data' has no entry for {', '.join(missing)}")
    unknown = [d for d in old_domains if d not in old_data]
    if spec.base_data:
        old_data, unknown = {**old_data, **_base_data(served, spec, unknown)}, []
    _check_grows_foreign(served, method, spec.expand_vocab, unknown)
    return old_domains, old_data


def _base_data(served, spec, unknown: list[str]) -> dict[str, DomainSource]:
    """--base-data as the data of the one domain the base has none of (a checkpoint's own)."""
    if len(unknown) != 1:
        has = (f"has {len(unknown)} domains without data ({', '.join(unknown)})" if unknown
               else "records the data of every domain it serves (run.json)")
        raise UserError(f"--base-data: {served.path} {has}; --base-data gives the text of the one domain of a "
                        "checkpoint that expandlm did not train")
    return {unknown[0]: DomainSource(spec.base_data, None, spec.limit, spec.val_limit)}


def _check_grows_foreign(served, method, expand_vocab: int, unknown: list[str]) -> None:
    """Refuse, in one line, what cannot grow a checkpoint expandlm did not train (its domains `plain`, those
    of them whose data is `unknown`)."""
    plain = ", ".join(served.card.plain)
    if expand_vocab and served.card.plain:
        raise UserError(f"{served.path}: --expand-vocab rebuilds the tokenizer with expandlm's own BOS, EOS and PAD "
                        f"tokens, so the text of {plain} (a checkpoint's own) would not start and end as before; "
                        "adapt without it (the new domain then gets a tag, or its own tokenizer with expand_branch)")
    if unknown and method.needs_old_data:
        raise UserError(f"{served.path}: method '{method.name}' trains on the old domains' data, and there is none "
                        f"of {', '.join(unknown)} (a checkpoint's own, which expandlm did not train); give a sample "
                        "of its text with --base-data FILE, or adapt it with expand_branch (the default)")


def _new_domain(served, method, domain):
    """The new domain as it will be requested. Over a checkpoint expandlm did not train, a method whose format
    picks the weights per domain (lora, expand_paths) makes it plain: a tag would grow the vocabulary, and
    with it the base domain's softmax, which those methods keep exact. The others append its tag."""
    plain = (served.card.plain and method.keeps_old_domains and not method.own_tokenizer
             and domain.tag not in served.tokenizer.get_vocab())
    if plain:
        log(f"{domain.name}: a plain domain like {', '.join(served.card.plain)} (no tag; {method.name}'s format "
            "picks its weights by domain)")
    elif served.card.plain and not method.keeps_old_domains:
        log(f"{', '.join(served.card.plain)}: {method.name} changes the weights it is served by, so it is not kept "
            "exact (--base-data measures by how much)")
    return dataclasses.replace(domain, plain=True) if plain else domain


def _starting_model(served, method, fmt, old_domains):
    """The model the method starts from, and its tokenizer."""
    if fmt.serves_old_from_base:  # the new domain grows from the trunk: the base's first domain's model
        return served.export_model(old_domains[0]), served.tokenizer_for(old_domains[0])
    if served.format.one_set_of_weights:
        return served.model, served.tokenizer
    able = [n for n, cls in METHODS.items() if FORMATS[cls.format].serves_old_from_base]
    raise UserError(f"{served.path}: adapting a {served.card.method} model again is not supported by the "
                    f"{method.name} method (no one set of weights serves all its domains); adapt it with "
                    f"{' or '.join(able)}, which leaves its domains to it, or adapt a model with one set of weights")


def _tokens_without_rows(served, model, tokenizer) -> None:
    """Say so where the base's tokenizer has tokens its embedding has no rows for (a Qwen2Tokenizer adds
    its <|endoftext|> to a tokenizer without it): a vocabulary grown from it gives them new rows."""
    rows, tokens = model.get_input_embeddings().num_embeddings, len(tokenizer)
    if tokens > rows:
        extra = tokenizer.convert_ids_to_tokens(list(range(rows, tokens)))
        log(f"{served.path}: its tokenizer has {tokens:,} tokens and its embedding {rows:,} rows; the tokens from "
            f"id {rows} ({', '.join(map(str, extra[:3]))}{', ...' if len(extra) > 3 else ''}) have no trained row, "
            "and start at new rows where the new domain's vocabulary has them")


def _needs_tag(served, method, spec, base_tokenizer, domain) -> bool:
    """Whether the old tokenizer lacks the new domain's tag (a user's domain, or code on an older model)."""
    needs_tag = (not method.own_tokenizer and not spec.expand_vocab and not domain.plain
                 and domain.tag not in base_tokenizer.get_vocab())
    if needs_tag and method.keeps_old_domains:
        raise UserError(f"{served.path}: its tokenizer has no tag {domain.tag}, and {method.name} keeps the old "
                        "domains bit-identical only over the old vocabulary; adapt with expand_branch (the default: "
                        f"{domain.name} gets a tokenizer of its own) or with --expand-vocab N")
    return needs_tag


def _tokenizer(run, method, base_tokenizer, domain, new_train, old_corpora, needs_tag, old_domain):
    """The new domain's tokenizer: the old one, grown by learned tokens or the tag, or (own_tokenizer) the
    method's for it (`old_domain`: the first domain of the base, the one `base_tokenizer` serves)."""
    spec, base_vocab = run.spec, len(base_tokenizer)
    if run.resume or not run.is_main and (spec.expand_vocab or method.own_tokenizer or needs_tag):
        return load_tokenizer(run.folder.path)
    if method.own_tokenizer:
        tokenizer = method.new_tokenizer(new_train.documents, base_tokenizer, domain, old_domain)
        log(f"tokenizer: {len(tokenizer)} tokens for {domain.name} (the old domains keep theirs)")
    elif spec.expand_vocab:
        keep = [doc for train_c, _ in old_corpora.values() for doc in train_c.documents[:KEEP_TEXTS]]
        tokenizer = expand_tokenizer(base_tokenizer, new_train.documents, spec.expand_vocab, keep_texts=keep)
        log(f"vocabulary: {base_vocab} → {len(tokenizer)} tokens ({len(tokenizer) - base_vocab} from {domain.name})")
    elif needs_tag:
        tokenizer = with_tag(base_tokenizer, domain.tag)
        log(f"vocabulary: {domain.tag} appended ({base_vocab} → {len(tokenizer)} tokens)")
    else:
        tokenizer = base_tokenizer
    return tokenizer


def _parameters(adapted, spec, model, base_vocab) -> tuple[int, int]:
    """(trainable, total) parameters; with --expand-vocab the old embedding rows do not train."""
    frozen_rows = 0
    if spec.expand_vocab and adapted.model is model:
        train_only_new_rows(adapted.model, base_vocab)
        frozen_rows = base_vocab * adapted.model.config.hidden_size
    return count_params(adapted.model, trainable_only=True) - frozen_rows, count_params(adapted.model)


def _bpb_before(served, val_shards, context: int | None) -> dict:
    """Each old domain's bpb before adapting: its run record's; a checkpoint's own domain has none, and is
    measured now on the base as served when --base-data gives its text."""
    before = served.folder.record().bpb if (served.folder / RUN_RECORD).exists() else {}
    measured = [d for d in served.card.plain if d not in before and d in val_shards]
    return {**before, **{d: evaluate_bpb(served.for_domain(d), val_shards[d], context=context)["bpb"]
                       for d in measured}}


def _measure(folder, method, val_shards, before: dict, old_domains, opened: dict | None,
             context: int | None) -> dict:
    """bpb on every domain of the saved folder (exactly what its users get), and the old domains' change.
    `opened`: the base as adapt loaded it, where the format serves the old domains from it untouched (a
    branch: its trunk is then not loaded twice)."""
    served = load_served(folder.path, opened=opened)
    bpb = {d: evaluate_bpb(served.for_domain(d), shard, context=context)["bpb"] for d, shard in val_shards.items()}
    before = {d: before.get(d) for d in old_domains}
    log(f"{method.name}: bpb " + ", ".join(f"{d} {v:.4f}" for d, v in bpb.items()) + f" → {folder.path}")
    return {"bpb": bpb, "bpb_before": before,
            "forgetting": {d: bpb[d] - before[d] for d in old_domains if before[d] is not None}}
