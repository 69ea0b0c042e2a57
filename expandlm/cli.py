"""Command line: `expandlm tokenizer | train | eval | generate | demo`.

User errors end in one `expandlm: error: ...` line (exit 2), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError


def _quiet_libraries() -> None:
    """Keep the terminal for our progress bar and results: silence library chatter."""
    import warnings

    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def cmd_tokenizer(args) -> None:
    from .corpus import load_corpus
    from .domains import get_domain
    from .tokenizer import encode_texts, train_bpe

    domain = get_domain(args.domain)
    corpus = load_corpus(args.data, domain, limit=args.limit)
    tok = train_bpe(corpus.documents, args.vocab_size)
    tok.save_pretrained(args.out)
    sample = corpus.documents[:2000]
    n_tokens = sum(len(ids) for ids in encode_texts(tok, sample))
    n_bytes = sum(len(d.encode()) for d in sample)
    print(f"tokenizer: {len(tok)} tokens ({', '.join(tok.all_special_tokens)} special) → {args.out}")
    print(f"{n_bytes / n_tokens:.2f} bytes/token on {len(sample)} {domain.name} documents")


def _train_config(args):
    from .train import TrainConfig
    return TrainConfig(batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       warmup_steps=args.warmup_steps, max_steps=args.max_steps, max_tokens=args.max_tokens,
                       minutes=args.minutes, eval_interval=args.eval_interval, eval_docs=args.eval_docs,
                       checkpoint_interval=args.checkpoint_interval, log_interval=args.log_interval, seed=args.seed, precision=args.precision,
                       compile=args.compile, progress=not args.no_progress)


def cmd_train(args) -> None:
    from .expert import ExpertSpec, train_expert

    if not args.resume and (args.domain is None or args.data is None):
        raise UserError("train needs --domain and --data (or --resume with the --out of an earlier run)")
    spec = ExpertSpec(domain=args.domain, data=args.data, out=args.out, preset=args.preset,
                      tokenizer=args.tokenizer, vocab_size=args.vocab_size, val_data=args.val_data,
                      limit=args.limit, cache_dir=args.cache_dir, train=_train_config(args))
    train_expert(spec, resume=args.resume)


def cmd_eval(args) -> None:
    from .artifacts import write_json_atomic
    from .corpus import load_corpus
    from .domains import get_domain
    from .evaluate import evaluate_bpb
    from .serving import load_served
    from .shards import build_shard

    domain = get_domain(args.domain)
    served = load_served(args.model)
    corpus = load_corpus(args.data, domain, split=args.split, limit=args.max_docs)
    shard = build_shard(corpus, served.tokenizer, args.cache_dir)
    result = {"model": str(args.model), "domain": domain.name, "data": str(args.data),
              **evaluate_bpb(served.for_domain(domain.name), shard)}
    out = Path(args.out) if args.out else Path(args.model) / f"eval-{domain.name}.json"
    write_json_atomic(out, result)
    print(json.dumps(result, indent=2))
    print(f"bpb {result['bpb']:.4f} on {result['documents']} {domain.name} documents → {out}", file=sys.stderr)


def cmd_generate(args) -> None:
    from .domains import get_domain
    from .generate import SamplingConfig, generate
    from .routing import route_request
    from .serving import load_served

    if (args.domain is None) == (args.request is None):
        raise UserError("generate needs exactly one of --domain (with an optional --prompt) or --request")
    served = load_served(args.model)
    domain_name, prompt, routed = args.domain, args.prompt, None
    if args.request is not None:
        routed = route_request(args.request, served)
        domain_name, prompt = routed.domain, routed.prompt
        print(f"[routed to {routed.domain} ({routed.confidence:.0%} confident; {routed.reason}); "
              f"prompt {prompt!r}]", file=sys.stderr)
    model = served.for_domain(domain_name)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    stream = args.num_samples == 1 and not args.json
    samples = generate(model, served.tokenizer, get_domain(domain_name), prompt, args.num_samples, sampling,
                       stream=stream)
    if args.json:
        result = {"domain": domain_name, "samples": [s.__dict__ for s in samples]}
        if routed:
            result["routing"] = {"domain": routed.domain, "confidence": routed.confidence, "scores": routed.scores,
                                 "reason": routed.reason, "prompt": routed.prompt}
        print(json.dumps(result, ensure_ascii=False, indent=2))
    elif stream:
        print()
    else:
        for i, s in enumerate(samples, 1):
            note = "" if s.finished else " (hit the length limit)"
            print(f"--- sample {i}{note}\n{s.text}\n")


def cmd_adapt(args) -> None:
    from .adapt import AdaptSpec, adapt

    if not args.resume and None in (args.base, args.strategy, args.domain, args.data):
        raise UserError("adapt needs --base, --strategy, --domain and --data (or --resume with an earlier --out)")
    options = {}
    for item in args.option or []:
        if "=" not in item:
            raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. --option new_blocks=2")
        key, value = item.split("=", 1)
        options[key.strip()] = value.strip()
    spec = AdaptSpec(base=args.base, strategy=args.strategy, domain=args.domain, data=args.data, out=args.out,
                     options=options, val_data=args.val_data, expand_vocab=args.expand_vocab, limit=args.limit,
                     cache_dir=args.cache_dir, train=_train_config(args))
    adapt(spec, resume=args.resume)


def cmd_compare(args) -> None:
    from .compare import Study, load_config

    Study(load_config(args.config), args.out, progress=not args.no_progress).run()
    print(f"report: {args.out}/report.md  results: {args.out}/results.json")


def cmd_demo(args) -> None:
    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(out=args.out, preset=args.preset, minutes=args.minutes, data_dir=args.data_dir,
                        hub=args.hub, limit=args.limit, seed=args.seed, progress=not args.no_progress))


def _training_flags(tr: argparse.ArgumentParser) -> None:
    """Flags shared by `train` and `adapt`: data, output, budget, optimisation, bookkeeping."""
    tr.add_argument("--domain", help="the domain to train on")
    tr.add_argument("--data", help="training corpus: a .jsonl(.gz), .txt, .parquet file or a hub dataset id")
    tr.add_argument("--val-data", help="validation corpus (default: hold out 1%% of --data)")
    tr.add_argument("--out", required=True)
    budget = tr.add_argument_group("budget (the smallest given wins; none: one epoch)")
    budget.add_argument("--minutes", type=_positive_float)
    budget.add_argument("--max-steps", type=_positive_int)
    budget.add_argument("--max-tokens", type=_positive_int)
    opt = tr.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=_positive_int, default=32, help="sequences per micro-batch per process")
    opt.add_argument("--grad-accum", type=_positive_int, default=1)
    opt.add_argument("--lr", type=_positive_float, default=2e-3)
    opt.add_argument("--warmup-steps", type=int)
    opt.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    opt.add_argument("--compile", action="store_true", help="torch.compile the model")
    tr.add_argument("--eval-interval", type=int, default=100, help="steps between validation passes")
    tr.add_argument("--eval-docs", type=_positive_int, default=200, help="validation documents per pass")
    tr.add_argument("--checkpoint-interval", type=_positive_int, default=200, help="steps between checkpoints")
    tr.add_argument("--log-interval", type=_positive_int, default=10, help="steps between metrics records")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--limit", type=_positive_int, help="use only the first N training documents")
    tr.add_argument("--cache-dir", help="token shard cache (default: $EXPANDLM_CACHE or ~/.cache/expandlm)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    tr.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from .model import PRESETS

    p = argparse.ArgumentParser(prog="expandlm", description="Small domain-specific language models that "
                                "learn new domains without forgetting old ones.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a domain corpus")
    t.add_argument("--domain", required=True)
    t.add_argument("--data", required=True, help="a .jsonl(.gz), .txt, .parquet file or a hub dataset id")
    t.add_argument("--vocab-size", type=_positive_int, default=2048)
    t.add_argument("--limit", type=_positive_int, help="use only the first N documents")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer)

    tr = sub.add_parser("train", help="train a domain expert from scratch (or --resume one)")
    tr.add_argument("--preset", default="tiny", choices=list(PRESETS))
    tr.add_argument("--tokenizer", help="a tokenizer folder, or gpt2 / bytes (default: train a BPE on --data)")
    tr.add_argument("--vocab-size", type=_positive_int, help="vocabulary of the trained BPE (default: the preset's)")
    _training_flags(tr)
    tr.set_defaults(func=cmd_train)

    ad = sub.add_parser("adapt", help="make a trained model serve a new domain with a strategy")
    ad.add_argument("--base", help="the model folder to adapt (e.g. an expert from `train`)")
    ad.add_argument("--strategy", help="full_ft | lora | joint | replay | ewc | expand | expand_paths")
    ad.add_argument("--option", action="append", metavar="KEY=VALUE",
                    help="a strategy option, repeatable: new_blocks=2, r=16, fraction=0.2, lam=1, from_scratch=false")
    ad.add_argument("--expand-vocab", type=int, default=0, metavar="N",
                    help="append N tokens learned from the new domain (old tokenization kept)")
    _training_flags(ad)
    ad.set_defaults(func=cmd_adapt)

    e = sub.add_parser("eval", help="bits per byte of a model on a domain's validation data")
    e.add_argument("--model", required=True)
    e.add_argument("--domain", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="validation", help="split, for a hub dataset id")
    e.add_argument("--max-docs", type=_positive_int)
    e.add_argument("--out", help="JSON output (default: MODEL/eval-DOMAIN.json)")
    e.add_argument("--cache-dir")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="write text of a domain on request")
    g.add_argument("--model", required=True)
    g.add_argument("--domain", help="the domain to write (its tag starts the text)")
    g.add_argument("--prompt", default="", help="a story opening, a recipe title, ...")
    g.add_argument("--request", help="free text such as 'write a recipe for banana bread': routed to a domain")
    g.add_argument("--num-samples", type=_positive_int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--max-new-tokens", type=_positive_int)
    g.add_argument("--json", action="store_true", help="print the samples as JSON")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("compare", help="run a whole study from a YAML config (strategies × evaluation suite)")
    c.add_argument("config", help="e.g. configs/stories-recipes.yaml (configs/smoke.yaml: a few minutes)")
    c.add_argument("--out", required=True)
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("demo", help="train, evaluate and sample one expert per domain (the README's main command)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--preset", default="tiny", choices=list(PRESETS))
    d.add_argument("--minutes", type=_positive_float, default=6.0, help="training budget per domain")
    d.add_argument("--data-dir", help="folder with the corpora (default: $EXPANDLM_DATA or ../shared/data)")
    d.add_argument("--hub", action="store_true", help="load the corpora from the Hugging Face Hub (online)")
    d.add_argument("--limit", type=_positive_int, help="use only the first N documents per corpus")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    _quiet_libraries()
    try:
        args.func(args)
    except UserError as e:
        print(f"expandlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nexpandlm: interrupted (a `train` run continues with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
