"""Routing accuracy (design.md §6): every router of `expandlm.routing` on the hand-written requests of
`tests/data/requests.jsonl` (never on training text), with a confusion matrix that has a no-domain
row and column, and the time each took to train.

The classifier routers are trained from the corpora in `corpus.default_data_dir()` (the first
`ROUTER_DOCS` documents per domain, as `load_router` does for a model folder). The likelihood and
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
from expandlm.corpus import default_data_dir, load_corpus  # noqa: E402
from expandlm.domains import get_domain  # noqa: E402
from expandlm.routing import (DEFAULT_ROUTER, ROUTER_DOCS, CombinedRouter, LikelihoodRouter, calibrate,  # noqa: E402
                              route, synthesise, train_router)

REQUESTS = ROOT / "tests" / "data" / "requests.jsonl"
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
    from expandlm.adapt import AdaptSpec, adapt
    from expandlm.expert import ExpertSpec, train_expert
    from expandlm.train import TrainConfig

    train = dict(max_steps=steps, batch_size=8, eval_interval=0, eval_docs=5, progress=False, log_interval=steps)
    names = ["stories", "recipes", "code"]
    train_expert(ExpertSpec(domain="stories", data=get_domain("stories").local_files(data)[0], out=str(out / "0"),
                            preset="nano", limit=3000, val_limit=50, cache_dir=str(out / "cache"),
                            train=TrainConfig(**train)))
    for i, name in enumerate(names[1:], 1):
        adapt(AdaptSpec(base=str(out / str(i - 1)), domain=name, strategy="replay", data=get_domain(name).local_files(data)[0],
                        out=str(out / str(i)), limit=3000, val_limit=50, cache_dir=str(out / "cache"),
                        train=TrainConfig(**train)))
    return out / str(len(names) - 1)


def markdown(results: dict) -> str:
    rows = results["routers"]
    domains = results["domains"] + [NONE]
    lines = [f"# Routing accuracy on {results['requests']} hand-written requests",
             "", f"Command: `{results['command']}`. Requests: `tests/data/requests.jsonl` "
             f"({', '.join(f'{d} {n}' for d, n in results['per_label'].items())}), written before any tuning. "
             f"Classifier routers trained on the first {results['router_docs']} documents per domain of "
             f"`{results['data']}`. Default router: `{DEFAULT_ROUTER}`. {results['model_note']}",
             "", "A request is right when routed to its domain with a confidence at or above the router's "
             "threshold, or, for a no-domain request, flagged as fitting no domain (threshold: the top "
             "probability that 98% of held-out synthesised in-domain requests reach).",
             "", "| router | accuracy | " + " | ".join(domains) + " | best guess, in-domain | threshold | train s | ms/request |",
             "|---|---|" + "---|" * len(domains) + "---|---|---|---|"]
    for name, r in rows.items():
        if "accuracy" not in r:
            lines.append(f"| {name} | not measured ({r['note']}) |" + " |" * (len(domains) + 4))
            continue
        lines.append(f"| {name} | {r['accuracy']:.1%} | " + " | ".join(f"{r['per_domain'].get(d, 0):.0%}" for d in domains)
                     + f" | {r['best_guess_accuracy_in_domain']:.1%} | {r['threshold']:.2f} | {r['train_seconds']:.1f}"
                     f" | {r['ms_per_request']:.1f} |")
    for name, r in rows.items():
        if "confusion" not in r:
            continue
        lines += ["", f"## {name}: confusion (rows: intended, columns: routed; `none`: flagged as no domain)", "",
                  "| | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
        lines += [f"| {t} | " + " | ".join(str(r["confusion"][t][p]) for p in domains) + " |" for t in domains]
        lines += ["", "Misses: " + ("; ".join(f"\"{m['request']}\" ({m['domain']} → {m['routed']} {m['confidence']:.2f}"
                                               f"{'' if m['fits'] else ', flagged'})" for m in r["misses"]) or "none")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--model", type=Path, help="a model folder serving every domain: measures likelihood and combined")
    ap.add_argument("--train-nano", action="store_true", help="train a nano model for likelihood and combined")
    ap.add_argument("--nano-steps", type=int, default=300)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "routing_accuracy")
    args = ap.parse_args(argv)
    requests = read_requests()
    names = sorted({r["domain"] for r in requests if r["domain"]})
    docs = {d: load_corpus(get_domain(d).local_files(args.data)[0], get_domain(d), limit=ROUTER_DOCS).documents
            for d in names}
    results = {"command": "python benchmarks/routing_accuracy.py" + (" --train-nano" if args.train_nano else "")
               + (f" --model {args.model}" if args.model else ""), "requests": len(requests), "domains": names,
               "per_label": {d or NONE: sum((r["domain"] or NONE) == (d or NONE) for r in requests)
                             for d in names + [None]},
               "data": str(args.data), "router_docs": ROUTER_DOCS, "routers": {}}
    trained = {}
    for kind in ("documents", "requests"):
        trained[kind] = router = train_router(docs, kind)
        results["routers"][kind] = {"train_seconds": router.train_seconds, **evaluate(router, requests)}
        print(f"{kind}: {results['routers'][kind]['accuracy']:.1%} ({router.train_seconds:.1f} s to train)", flush=True)
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
            from expandlm.serving import load_served
            served = load_served(model, device="cpu")
            if sorted(served.domains) != names:
                raise SystemExit(f"{model} serves {served.domains}; the requests need {names}")
            held = synthesise({d: v[-100:] for d, v in docs.items()}, {d: get_domain(d).nouns for d in names}, 30, 1)
            for kind, router in (("likelihood", LikelihoodRouter(served)),
                                 ("combined", CombinedRouter(trained["requests"], LikelihoodRouter(served)))):
                start = time.perf_counter()
                router.threshold = calibrate(router, held)
                results["routers"][kind] = {"train_seconds": time.perf_counter() - start, **evaluate(router, requests)}
                print(f"{kind}: {results['routers'][kind]['accuracy']:.1%}", flush=True)
        else:
            for kind in ("likelihood", "combined"):
                results["routers"][kind] = {"note": "no model given"}
    results["model_note"] = note
    write_json(args.out.with_suffix(".json"), results)
    write_text(args.out.with_suffix(".md"), markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
