"""Command line: `expandlm tokenizer | train | adapt | merge | distill | eval | generate | export | serve | compare | demo`.

The flags of `train`, `adapt`, `generate` and `demo` are made from the fields of their config
dataclasses (`config.flags`), so every default and help text is written once, beside the field; a
`--config FILE.yaml` gives the same settings as a file (flags given on the command line win).
User errors end in one `expandlm: error: ...` line (exit 2), never a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

from .errors import Stopped, UserError


def _quiet_libraries() -> None:
    """Keep the terminal for our progress bar and results: silence library chatter."""
    import warnings

    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")


DOMAIN_HELP = "a domain name, or the path of a domain spec (YAML)"
MODEL_HELP = "a model folder (from expandlm, or any checkpoint transformers saved), or a hub id such as Qwen/Qwen2.5-0.5B"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _spec(args, spec_cls, command: str):
    """A spec from `--config` (if given) overlaid with the flags given on the command line."""
    from .config import build, given, load_yaml
    from .training.loop import TrainConfig

    data = load_yaml(args.config) if args.config else {}
    data.update(given(args, spec_cls))
    train_field = {f.name: f for f in dataclasses.fields(spec_cls)}.get("train")
    if train_field is not None:  # the spec's own training defaults, then the file's, then the flags
        train = data.get("train") or {}
        if not isinstance(train, dict):
            raise UserError(f"{args.config}: 'train' must be a mapping of training settings")
        data["train"] = {**dataclasses.asdict(train_field.default_factory()), **train, **given(args, TrainConfig)}
    required = [f.name for f in dataclasses.fields(spec_cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
    if required:
        flags = ", ".join("--" + n.replace("_", "-") for n in required)
        raise UserError(f"{command} needs {flags} (as flags or keys of --config), or --resume with the --out "
                        "of an earlier run")
    return build(spec_cls, data, args.config or "command line")


def _resumed(args, spec_cls):
    from .training.run import saved_spec
    from .run_folder import RunFolder

    if getattr(args, "out", None) is None:
        raise UserError("--resume needs --out, the folder of the run to continue")
    folder = RunFolder(args.out)
    folder.begin(resume=True)
    return saved_spec(folder, spec_cls, progress=getattr(args, "progress", True))


def cmd_tokenizer(args) -> None:
    from .data.corpus import default_data_dir, load_corpus
    from .domains import get_domain
    from .run_folder import RunFolder
    from .data.tokenizer import encode_texts, train_bpe

    domain = get_domain(args.domain)
    corpus = load_corpus(args.data or domain.local_files(default_data_dir())[0], domain, limit=args.limit)
    tok = train_bpe(corpus.documents, args.vocab_size, [domain.tag])
    RunFolder(args.out).save(tok.save_pretrained)
    sample = corpus.documents[:2000]
    n_tokens = sum(len(ids) for ids in encode_texts(tok, sample))
    n_bytes = sum(len(d.encode()) for d in sample)
    print(f"tokenizer: {len(tok)} tokens ({', '.join(tok.all_special_tokens)} special) → {args.out}")
    print(f"{n_bytes / n_tokens:.2f} bytes/token on {len(sample)} {domain.name} documents")


def cmd_train(args) -> None:
    from .training.expert import ExpertSpec, train_expert

    spec = _resumed(args, ExpertSpec) if args.resume else _spec(args, ExpertSpec, "train")
    train_expert(spec, resume=args.resume)


def cmd_adapt(args) -> None:
    from .adapt.run import AdaptSpec, adapt
    from .config import parse_text
    from .adapt import method_class

    if args.resume:
        adapt(_resumed(args, AdaptSpec), resume=True)
        return
    spec = _spec(args, AdaptSpec, "adapt")  # the method: --method, --config's, or the default
    options = {}
    if args.option:
        options_cls = method_class(spec.method).Options
        for item in args.option:
            if "=" not in item:
                raise UserError(f"--option {item!r}: expected KEY=VALUE, e.g. --option new_blocks=2")
            key, value = (part.strip() for part in item.split("=", 1))
            known = {f.name for f in dataclasses.fields(options_cls)}
            options[key] = parse_text(options_cls, key, value) if key in known else value
    if options:
        spec = dataclasses.replace(spec, options={**spec.options, **options})
    adapt(spec)


def cmd_merge(args) -> None:
    from .merge.run import load_merge_config, merge

    folder = merge(load_merge_config(args.config), args.out, where=args.config)
    print(f"merged → {folder.path} (AutoModelForCausalLM, or PeftModel for an adapter, loads it)")


def cmd_distill(args) -> None:
    from .training.distill import distill, load_distill_spec

    spec = load_distill_spec(args.config, args.out)
    spec.train.progress = args.progress
    record = distill(spec, resume=args.resume)
    print(f"student → {args.out} (AutoModelForCausalLM loads it); bpb "
          + ", ".join(f"{d} {v:.4f}" for d, v in record.bpb.items()))


def cmd_eval(args) -> None:
    from .atomic import write_json
    from .data.corpus import default_data_dir, load_corpus
    from .evaluation.bpb import evaluate_bpb
    from .formats.served import load_served
    from .data.shards import build_shard

    served = load_served(args.model, base_domain=args.base_domain)
    domain = served.requested(args.domain)
    # a domain with no files of its own (a pretrained model's, unless named after one) needs --data
    data = args.data or (domain.local_files(default_data_dir())[1] if domain.spec.data.train else None)
    if data is None:
        raise UserError(f"domain '{domain.name}' names no validation file in its spec; pass --data")
    corpus = load_corpus(data, domain, split=args.split, limit=args.max_docs)
    shard = build_shard(corpus, served.tokenizer_for(domain.name), args.cache_dir)
    result = {"model": str(args.model), "domain": domain.name, "data": str(data),
              **evaluate_bpb(served.for_domain(domain.name), shard, context=args.context)}
    # the domain's own validation text is eval-DOMAIN.json; another file's result never replaces it
    out = Path(args.out) if args.out else served.path / (
        f"eval-{domain.name}.json" if args.data is None else f"eval-{domain.name}-{_file_label(args.data)}.json")
    if out.exists() and not _is_eval_result(out):
        raise UserError(f"{out}: exists and is not an expandlm eval result; expandlm never replaces it: "
                        "choose another --out")
    write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"bpb {result['bpb']:.4f} on {result['documents']} {domain.name} documents → {out}", file=sys.stderr)


def _file_label(data: str) -> str:
    """A data file's name as part of a file name: `recipes.valid.jsonl.gz` → `recipes.valid`."""
    return re.sub(r"\.(jsonl|json|txt)(\.gz)?$", "", Path(data).name) or "data"


def _is_eval_result(path: Path) -> bool:
    try:
        return {"model", "domain", "bpb"} <= set(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return False


def cmd_generate(args) -> None:
    from .config import build, given
    from .inference.generate import SamplingConfig, generate
    from .routing.router import route_request
    from .formats.served import load_served

    if args.domain is not None and args.request is not None:
        raise UserError("generate takes one of --domain (with an optional --prompt) or --request, not both")
    sampling = build(SamplingConfig, given(args, SamplingConfig), "sampling flags")
    served = load_served(args.model, base_domain=args.base_domain)
    prompt, routed = args.prompt, None
    if args.request is None:
        domain_name = served.requested(args.domain).name
    else:
        routed = route_request(args.request, served)
        domain_name, prompt = routed.domain, routed.prompt
        if not routed.fits:  # still answered by the best guess: say so before the text
            print(f"[warning: {routed.reason}; answering as {routed.domain} anyway; use --domain to choose]",
                  file=sys.stderr)
        print(f"[routed to {routed.domain} ({routed.confidence:.0%} confident; {routed.reason}); "
              f"prompt {prompt!r}]", file=sys.stderr)
    model = served.decode_model(domain_name)
    stream = args.num_samples == 1 and not args.json
    samples = generate(model, served.tokenizer_for(domain_name), served.domain(domain_name), prompt, args.num_samples, sampling,
                       stream=stream, engine=args.engine)
    if args.json:
        result = {"domain": domain_name, "samples": [s.__dict__ for s in samples]}
        if routed:
            result["routing"] = {"domain": routed.domain, "confidence": routed.confidence, "scores": routed.scores,
                                 "reason": routed.reason, "prompt": routed.prompt, "fits": routed.fits}
        print(json.dumps(result, ensure_ascii=False, indent=2))
    elif stream:
        print()
    else:
        for i, s in enumerate(samples, 1):
            note = "" if s.finished else " (hit the length limit)"
            print(f"--- sample {i}{note}\n{s.text}\n")


def cmd_export(args) -> None:
    from .formats.served import load_served


    if args.dtype and args.format != "gguf":
        raise UserError(f"--dtype {args.dtype} applies to --format gguf; a checkpoint keeps the model's own dtype")
    served = load_served(args.model, device="cpu", base_domain=args.base_domain)
    args.domain = served.requested(args.domain).name
    if args.format == "gguf":
        path = served.export_gguf(args.domain, args.out, args.dtype or "f32")
        start = "a text, as its tokenizer starts one" if args.domain in served.card.plain else \
            "the token ids of <|bos|><|domain|>"
        print(f"{args.domain} of {args.model} ({served.card.format}) → {path} (a GGUF file llama.cpp runs; "
              f"start from {start})")
        return
    folder = served.export(args.domain, args.out)
    print(f"{args.domain} of {args.model} ({served.card.format}) → {folder.path} "
          "(AutoModelForCausalLM / AutoTokenizer load it)")


API_KEY_ENV = "EXPANDLM_API_KEY"  # as vLLM's VLLM_API_KEY


def cmd_serve(args) -> None:
    from .serve.app import serve

    keys = args.api_key or [k for k in [os.environ.get(API_KEY_ENV, "")] if k]
    if any(not k.strip() for k in keys):
        raise UserError("--api-key: an empty key; give the key clients must send (Authorization: Bearer KEY)")
    serve(args.models, host=args.host, port=args.port, engine=args.engine, max_batch=args.max_batch,
          max_waiting=args.max_waiting, threads=args.threads, base_domain=args.base_domain, api_keys=tuple(keys),
          names=args.served_model_name)


def cmd_compare(args) -> None:
    from .studies import load_study

    cfg, study = load_study(args.config)
    study(cfg, args.out, progress=args.progress).run()
    print(f"report: {args.out}/report.md  results: {args.out}/results.json")


def cmd_demo(args) -> None:
    from .studies.demo import DemoConfig, run_demo

    run_demo(_spec(args, DemoConfig, "demo"))


def _engine_flag(p: argparse.ArgumentParser) -> None:
    from .inference.engine import ENGINES
    p.add_argument("--engine", choices=ENGINES, default=ENGINES[0],
                   help="fast: expandlm's decode loop with its C step (default); torch: the same loop in PyTorch only; "
                        "hf: transformers' generate (the same greedy tokens)")


def _model_flags(p: argparse.ArgumentParser) -> None:
    """What the read-side commands (eval, generate, export, serve) say of the model they read."""
    from .formats.checkpoint import BASE_DOMAIN
    p.add_argument("--base-domain", default=BASE_DOMAIN, metavar="NAME",
                   help="the name of a pretrained checkpoint's own behaviour (a folder transformers saved, with no "
                        f"expandlm.json): its one domain, requested with no tag (default: {BASE_DOMAIN})")


def _with_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML file with any of the settings below (flags given here win)")


def _training_command(p: argparse.ArgumentParser, spec_cls) -> None:
    """Flags of `train` / `adapt`: the spec's fields, then the training loop's."""
    from .config import flags
    from .training.loop import TrainConfig

    _with_config(p)
    flags(p, spec_cls)
    flags(p.add_argument_group("training loop (budgets: the smallest given wins; none: one epoch)"), TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def _tokenizer_flags(t: argparse.ArgumentParser) -> None:
    t.add_argument("--domain", required=True, help=DOMAIN_HELP)
    t.add_argument("--data", help="a .jsonl(.gz), .txt, .parquet file or a hub dataset id (default: the domain "
                   "spec's training file)")
    t.add_argument("--vocab-size", type=_positive_int, default=2048)
    t.add_argument("--limit", type=_positive_int, help="use only the first N documents")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer)


def _train_flags(tr: argparse.ArgumentParser) -> None:
    from .training.expert import ExpertSpec

    _training_command(tr, ExpertSpec)
    tr.set_defaults(func=cmd_train)


def _adapt_flags(ad: argparse.ArgumentParser) -> None:
    from .adapt.run import AdaptSpec

    _training_command(ad, AdaptSpec)
    ad.add_argument("--option", action="append", metavar="KEY=VALUE",
                    help="a method option, repeatable: new_blocks=2, r=16, target_modules=q_proj,v_proj, "
                         "fraction=0.2, lam=1, from_scratch=false")
    ad.set_defaults(func=cmd_adapt)


def _merge_flags(m: argparse.ArgumentParser) -> None:
    m.add_argument("config", help="a mergekit-style YAML: method, base, models (model, weight), parameters")
    m.add_argument("--out", required=True, help="the merged model's folder (a new one)")
    m.set_defaults(func=cmd_merge)


def _distill_flags(di: argparse.ArgumentParser) -> None:
    di.add_argument("config", help="YAML: teachers ({model, domain} each), student, alpha, temperature, train")
    di.add_argument("--out", required=True, help="the student's run folder")
    di.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    di.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    di.set_defaults(func=cmd_distill)


def _eval_flags(e: argparse.ArgumentParser) -> None:
    from .model.window import DEFAULT_CONTEXT

    e.add_argument("--model", required=True, help=MODEL_HELP)
    e.add_argument("--domain", help=DOMAIN_HELP + " (default: the model's one domain)")
    _model_flags(e)
    e.add_argument("--data", help="validation data (default: the domain spec's validation file)")
    e.add_argument("--split", default="validation", help="split, for a hub dataset id")
    e.add_argument("--max-docs", type=_positive_int)
    e.add_argument("--context", type=_positive_int, help="tokens per scoring window (default: the model's context, "
                   f"at most {DEFAULT_CONTEXT}; longer documents are scored in windows overlapping by half)")
    e.add_argument("--out", help="JSON output (default: MODEL/eval-DOMAIN.json)")
    e.add_argument("--cache-dir")
    e.set_defaults(func=cmd_eval)


def _generate_flags(g: argparse.ArgumentParser) -> None:
    from .config import flags
    from .inference.generate import SamplingConfig

    g.add_argument("--model", required=True, help=MODEL_HELP)
    g.add_argument("--domain", help="the domain to write (its tag starts the text): " + DOMAIN_HELP
                   + " (default: the model's one domain)")
    _model_flags(g)
    g.add_argument("--prompt", default="", help="a story opening, a recipe title, ...")
    g.add_argument("--request", help="free text such as 'write a recipe for banana bread': routed to a domain")
    g.add_argument("--num-samples", type=_positive_int, default=1, metavar="N",
                   help="texts to write, each from its own seed (default: 1)")
    g.add_argument("--json", action="store_true", help="print the samples as JSON")
    _engine_flag(g)
    flags(g.add_argument_group("sampling"), SamplingConfig)
    g.set_defaults(func=cmd_generate)


def _export_flags(x: argparse.ArgumentParser) -> None:
    from .formats.gguf import GGUF_DTYPES

    x.add_argument("model", help=MODEL_HELP)
    x.add_argument("--domain", help="the domain whose model to write (default: the model's one domain)")
    _model_flags(x)
    x.add_argument("--format", choices=("checkpoint", "gguf"), default="checkpoint",
                   help="checkpoint: a transformers folder (default); gguf: one file for llama.cpp")
    x.add_argument("--dtype", choices=GGUF_DTYPES, help="the GGUF file's matrices: f32 (default, what expandlm "
                   "computes), f16, bf16 or q8_0 (8-bit blocks, llama.cpp's quantizer); norms stay f32")
    x.add_argument("--out", required=True, help="the checkpoint folder (or with --format gguf, the file) to write")
    x.set_defaults(func=cmd_export)


def _serve_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("models", nargs="+", metavar="MODEL_DIR", help="model folders (or hub ids); every domain of each "
                   "is a model id")
    _model_flags(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000)
    _engine_flag(s)
    s.add_argument("--max-batch", type=_positive_int, default=8,
                   help="sequences of one domain decoded together in one batched step (default: 8)")
    s.add_argument("--max-waiting", type=_positive_int, default=64,
                   help="requests that may wait for a slot; more are answered 429 (default: 64)")
    s.add_argument("--threads", type=_positive_int,
                   help="torch threads: prompts and the torch/hf engines; the C decode step uses one (default: torch's)")
    s.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="what each model folder is called in model ids (NAME/DOMAIN), one name a folder, as vLLM's "
                        "flag (default: the folder's name)")
    s.add_argument("--api-key", action="append", metavar="KEY",
                   help=f"require this key on /v1/* (Authorization: Bearer KEY), as vLLM's --api-key; repeat it "
                        f"for several keys; /health and the page stay open (default: ${API_KEY_ENV}, else none)")
    s.set_defaults(func=cmd_serve)


def _compare_flags(c: argparse.ArgumentParser) -> None:
    c.add_argument("config", help="e.g. configs/stories-recipes.yaml (configs/smoke.yaml: a few minutes)")
    c.add_argument("--out", required=True)
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    c.set_defaults(func=cmd_compare)


def _demo_flags(d: argparse.ArgumentParser) -> None:
    from .config import default_of, flags
    from .studies.demo import DemoConfig
    from .training.loop import TrainConfig

    _with_config(d)
    flags(d, DemoConfig)
    flags(d.add_argument_group("training loop of every stage (defaults: the demo's on this machine)"), TrainConfig,
          defaults=default_of(DemoConfig, "train"))
    d.set_defaults(func=cmd_demo)


# name: (its line in `expandlm --help`, what adds its flags), in the order `expandlm --help` lists them
_COMMANDS = {
    "tokenizer": ("train a byte-level BPE tokenizer on a domain corpus",
        _tokenizer_flags),
    "train": ("train a domain expert from scratch (or --resume one)",
        _train_flags),
    "adapt": ("make a trained model serve a new domain with a method (expand_branch, lora, ...)",
        _adapt_flags),
    "merge": ("merge experts of one common start (linear, task arithmetic, TIES, DARE, Fisher, RegMean)",
        _merge_flags),
    "distill": ("train one student on several experts' outputs (alpha 0: joint training)",
        _distill_flags),
    "eval": ("bits per byte of a model on a domain's validation data",
        _eval_flags),
    "generate": ("write text of a domain on request",
        _generate_flags),
    "export": ("write one domain of a model as a standard checkpoint or a GGUF file",
        _export_flags),
    "serve": ("an OpenAI-compatible API and a web page over model folders",
        _serve_flags),
    "compare": ("run a whole study from a YAML config (strategies × evaluation suite)",
        _compare_flags),
    "demo": ("one model: an expert, each further domain added, every domain answered (the README's main command)",
        _demo_flags),
}


class Parser(argparse.ArgumentParser):
    """argparse, with "did you mean" for a misspelt command or choice (argparse has it only from Python
    3.14, as suggest_on_error); its subcommands' parsers are of this class too."""

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            from .errors import did_you_mean
            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{did_you_mean(value, action.choices)} "
                                                 f"(choose from {choices})")
        super()._check_value(action, value)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command with its line of help, and the flags of `only` (of every command when None): a
    command's flags come from its stage's settings, whose import (torch, transformers, peft) takes seconds
    that `expandlm --help` and a misspelt command need not wait for (vLLM's CLI defers them so too)."""
    p = Parser(prog="expandlm", description="Small domain-specific language models that "
                                "learn new domains without forgetting old ones.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_flags) in _COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if only is None or name == only:
            add_flags(command)
    return p


def _command_in(argv: list[str]) -> str:
    """The command `argv` invokes (its first word that is no option), or "" for none."""
    return next((a for a in argv if not a.startswith("-")), "")


def _terminated(signum, frame):
    raise Stopped("stopped by SIGTERM (a `train` or `adapt` run continues from its last checkpoint with --resume)",
                  signum)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # SIGTERM ends a command as Ctrl-C does, in one line (training saves first: see process.StopRequests)
    previous = signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() else None
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser(only=_command_in(argv)).parse_args(argv)
        _quiet_libraries()
        args.func(args)
    except UserError as e:
        print(f"expandlm: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"\nexpandlm: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\nexpandlm: interrupted (a `train` or `adapt` run continues from its last checkpoint with --resume)",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
