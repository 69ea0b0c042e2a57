"""Routing accuracy (docs/DESIGN.md, "Routing"): every router of `expandlm.routing.router` on sets of
hand-written requests (never on training text): `tests/data/requests.jsonl` and
`tests/data/requests_plain.jsonl` (plain how-to questions and invitations to imagine, without a genre noun)
by default, `--requests` to name others; with a confusion matrix that has a no-domain row and column, and
the time each took to train.

The classifier routers are trained from the corpora in `corpus.default_data_dir()` (the first
`VOCABULARY_DOCS` documents per domain, as `load_router` does for a model folder: the classifiers
read the first `ROUTER_DOCS` of them, the vocabulary router's word counts all of them). The likelihood and
combined routers need a model that serves every domain of the requests: `--model FOLDER`, or
`--train-nano` trains a nano stories expert and adapts it to recipes and code with `replay`
(`--nano-steps` each; over 10 minutes on 2 busy cores, and far from converged). Without
either they are reported as not measured.

    python benchmarks/routing_accuracy.py                    # the classifier routers, ~1 minute on 2 cores
    python benchmarks/routing_accuracy.py --train-nano       # + likelihood and combined on a nano model
    python benchmarks/routing_accuracy.py --model runs/stories+recipes+code
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from expandlm.atomic import write_json, write_text  # noqa: E402
from expandlm.data.corpus import default_data_dir, load_corpus  # noqa: E402
from expandlm.domains import get_domain  # noqa: E402
from expandlm.routing.router import (DEFAULT_ROUTER, ROUTER_DOCS, TRAINED_ROUTERS, VOCABULARY_DOCS, CombinedRouter,  # noqa: E402
                              LikelihoodRouter, calibrate, route, synthesise, train_router)

REQUESTS = ROOT / "tests" / "data" / "requests.jsonl"
REQUEST_SETS = (REQUESTS, ROOT / "tests" / "data" / "requests_plain.jsonl")
NONE = "none"

def read_requests(path: Path = REQUESTS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

def evaluate(router, requests: list[dict]) -> dict:
    """Accuracy (a no-domain request is right when flagged, an in-domain one when routed to its domain
    and not flagged), accuracy per true domain, the domain accuracy without the flag, the confusion
    matrix (true -> predicted, `none` for flagged) and every miss."""
    domains = sorted(router.domains)
    labels = domains + [NONE]
    matrix = {t: {p: 0 for p in labels} for t in labels}
    misses, best_guess_right, in_domain = [], 0, 0
    start = time.perf_counter()
    for r in requests:
        routed = route(r["request"], router)
        truth, guess = r["domain"] or NONE, routed.domain if routed.fits else NONE
        matrix[truth][guess] += 1
        if truth != NONE:
            in_domain += 1
            best_guess_right += routed.domain == truth
        if guess != truth:
            misses.append({"request": r["request"], "domain": truth, "routed": routed.domain,
                           "confidence": round(routed.confidence, 3), "fits": routed.fits})
    seconds = time.perf_counter() - start
    per = {t: matrix[t][t] / sum(matrix[t].values()) for t in labels if sum(matrix[t].values())}
    return {"accuracy": sum(matrix[t][t] for t in labels) / len(requests), "per_domain": per,
            "best_guess_accuracy_in_domain": best_guess_right / in_domain, "threshold": router.threshold,
            "confusion": matrix, "misses": misses, "ms_per_request": 1000 * seconds / len(requests)}

def nano_model(out: Path, data: Path, steps: int) -> Path:
    """A nano model serving stories, recipes and code: an expert, adapted twice with `replay` (the
    default strategy, expand_branch, cannot be adapted again yet)."""
    from expandlm.adapt.run import AdaptSpec, adapt
    from expandlm.training.expert import ExpertSpec, train_expert
    from expandlm.training.loop import TrainConfig

    train = dict(max_steps=steps, batch_size=8, eval_interval=0, eval_docs=5, progress=False, log_interval=steps)
    names = ["stories", "recipes", "code"]
    train_expert(ExpertSpec(domain="stories", data=get_domain("stories").local_files(data)[0], out=str(out / "0"),
                            preset="nano", limit=3000, val_limit=50, cache_dir=str(out / "cache"),
                            train=TrainConfig(**train)))
    for i, name in enumerate(names[1:], 1):
        adapt(AdaptSpec(base=str(out / str(i - 1)), domain=name, method="replay", data=get_domain(name).local_files(data)[0],
                        out=str(out / str(i)), limit=3000, val_limit=50, cache_dir=str(out / "cache"),
                        train=TrainConfig(**train)))
    return out / str(len(names) - 1)

def markdown(results: dict) -> str:
    sets = results["sets"]
    lines = ["# Routing accuracy on hand-written requests", "",
             f"Command: `{results['command']}`. Classifier routers trained on the first {results['router_docs']} "
             f"documents per domain of `{results['data']}` (the vocabulary router's word counts on the first "
             f"{results['vocabulary_docs']}). Default router: `{DEFAULT_ROUTER}`. {results['model_note']}",
             "", "A request is right when routed to its domain with a confidence at or above the router's "
             "threshold, or, for a no-domain request, flagged as fitting no domain (threshold: the top "
             "probability that 98% of held-out synthesised in-domain requests reach). Every set was written "
             "by hand before the routers it measures were tuned, and none is used to tune them.",
             "", "| router | " + " | ".join(f"`{name}` ({s['requests']})" for name, s in sets.items()) + " |",
             "|---|" + "---|" * len(sets)]
    for kind in next(iter(sets.values()))["routers"]:
        cells = [s["routers"][kind] for s in sets.values()]
        lines.append(f"| {kind} | " + " | ".join(f"{c['accuracy']:.1%}" if "accuracy" in c else "not measured"
                                                 for c in cells) + " |")
    for name, s in sets.items():
        lines += ["", *set_markdown(name, s, results["domains"] + [NONE])]
    return "\n".join(lines) + "\n"

def set_markdown(name: str, results: dict, domains: list[str]) -> list[str]:
    rows = results["routers"]
    lines = [f"## `{name}`: {results['requests']} requests "
             f"({', '.join(f'{d} {n}' for d, n in results['per_label'].items() if n)})",
             "", "| router | accuracy | " + " | ".join(domains) + " | best guess, in-domain | threshold | train s | ms/request |",
             "|---|---|" + "---|" * len(domains) + "---|---|---|---|"]
    for kind, r in rows.items():
        if "accuracy" not in r:
            lines.append(f"| {kind} | not measured ({r['note']}) |" + " |" * (len(domains) + 4))
            continue
        lines.append(f"| {kind} | {r['accuracy']:.1%} | "
                     + " | ".join(f"{r['per_domain'][d]:.0%}" if d in r["per_domain"] else "–" for d in domains)
                     + f" | {r['best_guess_accuracy_in_domain']:.1%} | {r['threshold']:.2f} | {r['train_seconds']:.1f}"
                     f" | {r['ms_per_request']:.1f} |")
    for kind, r in rows.items():
        if "confusion" not in r:
            continue
        lines += ["", f"### `{name}`, {kind}: confusion (rows: intended, columns: routed; `none`: flagged as no domain)",
                  "", "| | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        lines += [f"| {t} | " + " | ".join(str(r["confusion"][t][p]) for p in domains) + " |" for t in domains
                  if sum(r["confusion"][t].values())]
        lines += ["", "Misses: " + ("; ".join(f"\"{m['request']}\" ({m['domain']} → {m['routed']} {m['confidence']:.2f}"
                                               f"{'' if m['fits'] else ', flagged'})" for m in r["misses"]) or "none")]
    return lines

def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--requests", type=Path, nargs="+", default=list(REQUEST_SETS), help="JSONL request sets")
    ap.add_argument("--model", type=Path, help="a model folder serving every domain: measures likelihood and combined")
    ap.add_argument("--train-nano", action="store_true", help="train a nano model for likelihood and combined")
    ap.add_argument("--nano-steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "routing_accuracy")
    args = ap.parse_args(argv)
    sets = {path.stem: read_requests(path) for path in args.requests}
    names = sorted({r["domain"] for rows in sets.values() for r in rows if r["domain"]})
    docs = {d: load_corpus(get_domain(d).local_files(args.data)[0], get_domain(d), limit=VOCABULARY_DOCS).documents
            for d in names}
    results = {"command": "python benchmarks/routing_accuracy.py" + (" --train-nano" if args.train_nano else "")
               + (f" --model {args.model}" if args.model else ""), "domains": names, "data": str(args.data),
               "router_docs": ROUTER_DOCS, "vocabulary_docs": VOCABULARY_DOCS,
               "sets": {name: {"requests": len(rows), "routers": {},
                               "per_label": {d or NONE: sum((r["domain"] or NONE) == (d or NONE) for r in rows)
                                             for d in names + [None]}} for name, rows in sets.items()}}

    def measure(kind, router, train_seconds):
        for name, rows in sets.items():
            results["sets"][name]["routers"][kind] = {"train_seconds": train_seconds, **evaluate(router, rows)}
            print(f"{name}, {kind}: {results['sets'][name]['routers'][kind]['accuracy']:.1%}", flush=True)

    trained = {}
    for kind in TRAINED_ROUTERS:
        trained[kind] = router = train_router(docs, kind)
        measure(kind, router, router.train_seconds)
    model, note = args.model, "Likelihood and combined: not measured (no `--model` or `--train-nano` given)."
    with tempfile.TemporaryDirectory() as tmp:
        if args.train_nano:
            start = time.perf_counter()
            model = nano_model(Path(tmp), args.data, args.nano_steps)
            note = (f"Likelihood and combined: a nano model trained here, stories then adapted to recipes and code "
                    f"({args.nano_steps} steps of 8 documents each, {time.perf_counter() - start:.0f} s in all).")
        elif model:
            note = f"Likelihood and combined: the model `{model}`."
        if model:
            from expandlm.formats.served import load_served
            served = load_served(model, device="cpu")
            if sorted(served.domains) != names:
                raise SystemExit(f"{model} serves {served.domains}; the requests need {names}")
            held = synthesise({d: v[ROUTER_DOCS - 100:ROUTER_DOCS] for d, v in docs.items()}, {d: get_domain(d).nouns for d in names}, 30, 1)
            for kind, router in (("likelihood", LikelihoodRouter(served)),
                                 ("combined", CombinedRouter(trained[DEFAULT_ROUTER], LikelihoodRouter(served)))):
                start = time.perf_counter()
                router.threshold = calibrate(router, held)
                measure(kind, router, time.perf_counter() - start)
        else:
            for name in sets:
                results["sets"][name]["routers"].update({k: {"note": "no model given"} for k in ("likelihood", "combined")})
    results["model_note"] = note
    write_json(args.out.with_suffix(".json"), results)
    write_text(args.out.with_suffix(".md"), markdown(results))
    print(markdown(results))

if __name__ == "__main__":
    main()
