"""Reports: results people compare as a markdown table and a plot."""
from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_path, read_json, write_text
from ..run_folder import SUITE


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str = "", eval_docs: int | None = None) -> Path:
    """Training loss and validation bpb against tokens seen, one line per run. `eval_docs`: how many
    validation documents each periodic pass read (a run's final bpb reads them all, so it differs)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    for name, records in curves.items():
        train = [r for r in records if "loss" in r]
        val = [r for r in records if "val_bpb" in r]
        if train:
            ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], label=name)
        if val:
            ax_bpb.plot([r["tokens"] for r in val], [r["val_bpb"] for r in val], marker="o", ms=3, label=name)
    ax_loss.set(xlabel="tokens seen", ylabel="training loss (nats/token)", title="training loss")
    ax_bpb.set(xlabel="tokens seen", ylabel="validation bits per byte",
               title=f"validation bpb (periodic: first {eval_docs} documents)" if eval_docs else "validation bpb")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, Path(path))
    return Path(path)


def _bars(ax, labels: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    import numpy as np
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, [v if v is not None else 0 for v in values], width,
                      label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend()


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _gap_curve(out: Path, rows: list[dict], new: str) -> list[str]:
    """The new-domain gap against training tokens, per strategy: mean over seeds, bars from the lowest to
    the highest seed. Returns the report's lines (a table: one row per strategy, one column per budget)."""
    import statistics

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = [r for r in rows if r["strategy"] not in ("base", "scratch")]
    budgets = sorted({r["adapt_tokens"] for r in runs})
    table = []
    fig, ax = plt.subplots(figsize=(10.5, 5))
    for i, label in enumerate(dict.fromkeys(r["label"] for r in runs)):
        mine = [r for r in runs if r["label"] == label]
        points, line = [], {"strategy": label,
                            "forgetting (worst)": _pct(max(r["forgetting_rel"] for r in mine))}
        for t in budgets:
            gaps = [100 * r["new_domain_gap"] for r in mine if r["adapt_tokens"] == t]
            if gaps:
                mean = statistics.fmean(gaps)
                points.append((t, mean, mean - min(gaps), max(gaps) - mean))
                spread = f" ({min(gaps):+.1f}..{max(gaps):+.1f}, {len(gaps)} seeds)" if len(gaps) > 1 else ""
                line[f"gap at {t / 1e6:g}M"] = f"{mean:+.1f}%{spread}"
        table.append(line)
        xs, ys, lo, hi = zip(*points)
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=4, capsize=3, label=label,
                    color=plt.cm.tab20(i % 20), ls="-" if i < 10 else "--")
    ax.axhline(0, color="k", lw=1, label=f"{new} scratch expert")
    ylabel = f"{new} bpb vs its scratch expert (%)"
    gaps = [100 * r["new_domain_gap"] for r in runs]
    if max(map(abs, gaps)) > 60:  # a far-off rival would flatten the close ones
        ax.set_yscale("symlog", linthresh=20)
        ax.set_yticks([t for t in (-40, -20, -10, 0, 10, 20, 50, 100, 200, 500) if t <= 1.5 * max(gaps)])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ylabel += ", linear within ±20%"
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{t / 1e6:g}M" for t in budgets])
    ax.set_xticks([], minor=True)  # the log axis's own minor labels (6×10⁵) would stand between ours
    ax.set(xlabel=f"training tokens of {new}", ylabel=ylabel,
           title="new-domain gap against tokens (lower is better; bars: lowest..highest seed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the curves fill the axes
    _save(fig, out / "new_domain_gap.png")
    columns = ["strategy", *[f"gap at {t / 1e6:g}M" for t in budgets], "forgetting (worst)"]
    return ["## The new-domain gap against tokens", "", markdown_table(table, columns), "",
            "![new-domain gap](new_domain_gap.png)", "", "## Every run", ""]


def write_study_report(out: Path, results: dict) -> None:
    """`report.md` with the strategy table, the plots, the tokenizer study and sample generations."""
    cfg, rows = results["config"], results["models"]
    old, new = cfg["old_domain"], cfg["new_domain"]
    budgets = sorted({r["adapt_tokens"] for r in rows if r["strategy"] != "base"})
    first = [r for r in rows if r["seed"] == cfg["seeds"][0]]
    # the plots of one study point: the first seed at the budget where it ran the most strategies
    shown = max(budgets, key=lambda t: (sum(r["adapt_tokens"] == t for r in first), t))
    seed0 = [r for r in first if r["strategy"] == "base" or r["adapt_tokens"] == shown]
    _plot_bpb_and_forgetting(seed0, old, new, out / "bpb_and_forgetting.png")
    _plot_learning_curves(out, seed0, new, f"{shown:,} tokens, seed {cfg['seeds'][0]}", out / "learning_curves.png")
    curve_lines = _gap_curve(out, rows, new) if len(budgets) > 1 else []
    table = _study_table(rows, [old, new])
    lines = [f"# expandlm study: {old} → {new} ({cfg['preset']} preset)", "",
             f"Base: a {old} expert trained on {cfg['base_tokens']:,} tokens. Every strategy then trains on "
             f"{' / '.join(f'{t:,}' for t in budgets)} tokens of {new} (the {new} scratch expert too, at each budget: "
             "the reference of the new-domain gap). "
             "bpb: bits per byte on each domain's validation set. forgetting: relative change of the old "
             "domain's bpb. ctrl acc: share of samples requested for a domain that a held-out classifier "
             "(trained on real text only) assigns to it. valid: share of generated samples that pass the domain's "
             "structural check and ended before the context limit; (fit ceiling): the same share of the real "
             "validation documents that fit the context with the model's tokenizer, the most a perfect model "
             "could score. ended, distinct-2: text health of the samples.", "",
             *curve_lines, markdown_table(table, list(table[0])), "",
             "![bpb and forgetting](bpb_and_forgetting.png)", "", "![learning curves](learning_curves.png)", ""]
    if results.get("tokenizer_study"):
        lines += _tokenizer_section(results["tokenizer_study"], out / "tokenizer_study.png")
    lines += _samples_section(out, seed0)
    write_text(out / "report.md", "\n".join(lines))


def _plot_bpb_and_forgetting(shown: list[dict], old: str, new: str, path: Path) -> None:
    """Both domains' bpb of every model shown, and the old domain's change after each adaptation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in shown]
    fig, (ax_bpb, ax_forget) = plt.subplots(1, 2, figsize=(14, 4.5))
    _bars(ax_bpb, labels, {f"{old} bpb": [r["bpb"][old] for r in shown], f"{new} bpb": [r["bpb"][new] for r in shown]},
          "validation bits per byte", "bpb on both domains (lower is better)")
    before = next(r["bpb"][old] for r in shown if r["strategy"] == "base")
    ax_bpb.axhline(before, color="C0", ls="--", lw=0.8)
    forget = [r for r in shown if r["forgetting"] is not None and r["strategy"] != "base"]
    _bars(ax_forget, [r["label"] for r in forget], {"forgetting": [100 * r["forgetting_rel"] for r in forget]},
          f"{old} bpb change after adaptation (%)", f"forgetting of {old}")
    _save(fig, path)


def _plot_learning_curves(out: Path, shown: list[dict], new: str, point: str, path: Path) -> None:
    """The new domain's validation bpb over training of every model shown but the base (`point`: which)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..run_folder import RunFolder

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(r for r in shown if r["strategy"] != "base"):
        curve = [m for m in RunFolder(out / r["model"]).metrics() if "val_bpb" in m]
        ax.plot([m["tokens"] for m in curve], [m["val_bpb"] for m in curve], marker=".", label=r["label"],
                color=plt.cm.tab20(i % 20), ls="-" if i < 10 else "--")
    ax.set(xlabel="training tokens", ylabel=f"{new} validation bpb", title=f"learning curves on {new} ({point})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def _study_table(rows: list[dict], domains: list[str]) -> list[dict]:
    """The report's table of a two-domain study: one line per model."""
    table = []
    for r in rows:
        acc = r["domain_accuracy"] or {}
        row = {"model": r["label"], "seed": r["seed"], "budget": r["adapt_tokens"] if r["strategy"] != "base" else None,
               **{f"bpb {d}": r["bpb"][d] for d in domains},
               "forgetting": _pct(r["forgetting_rel"]), "new-domain gap": _pct(r["new_domain_gap"]),
               **{f"ctrl acc {d}": acc.get(d) for d in domains}}
        for d, ceiling in r["validity_ceiling"].items():
            row[f"{d} valid"] = r["validity"].get(d)
            row["(fit ceiling)"] = ceiling
        for d in domains:
            health = r["health"].get(d) or {}
            row[f"{d} ended"] = health.get("finished_share")
            row[f"{d} distinct-2"] = health.get("distinct_2")
        row.update({"trainable": r["trainable_params"], "total": r["total_params"], "tokens": r["tokens"],
                    "minutes": None if r["seconds"] is None else round(r["seconds"] / 60, 2)})
        table.append(row)
    return table


def _tokenizer_section(tok_rows: list[dict], path: Path) -> list[str]:
    """The report's lines of the tokenizer study, and its plot in `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    kinds = list(dict.fromkeys(r["tokenizer"] for r in tok_rows))
    domains = list(dict.fromkeys(r["domain"] for r in tok_rows))
    _bars(ax, kinds, {d: [next((r["bpb"] for r in tok_rows if r["domain"] == d and r["tokenizer"] == k), None)
                          for k in kinds] for d in domains}, "validation bpb", "tokenizer study (equal tokens)")
    _save(fig, path)
    return ["## Tokenizer study", "", markdown_table(tok_rows, list(tok_rows[0])), "",
            f"![tokenizer study]({path.name})", ""]


def _samples_section(out: Path, shown: list[dict]) -> list[str]:
    """The report's lines with two samples per model shown and domain; every sample in `samples.json`."""
    import json

    lines = ["## Samples", "", "Two samples per model and domain; all of them are in `samples.json`.", ""]
    samples = {}
    for r in shown:
        suite = read_json(out / r["model"] / SUITE)
        samples[r["label"]] = suite.get("samples", {})
        for domain, drawn in suite.get("samples", {}).items():
            for i, s in enumerate(drawn[:2], 1):
                lines += [f"### {r['label']}: {domain} {i}{'' if s['finished'] else ' (hit the length limit)'}",
                          "", "```", s["text"], "```", ""]
    write_text(out / "samples.json", json.dumps(samples, indent=1, ensure_ascii=False))
    return lines


def plot_growth(rows: list[dict], domains: list[str], path: Path) -> Path:
    """Per strategy: the bpb of each domain after each step (from the step that added it), each domain's
    scratch expert a dashed line of the same colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in rows if r["strategy"] == "base")
    reference = {r["added"]: r["bpb"][r["added"]] for r in rows if r["strategy"] in ("base", "scratch")}
    labels = list(dict.fromkeys(r["label"] for r in rows if r["step"]))
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 4.5), sharey=True, squeeze=False)
    steps = [domains[0], *(f"+{d}" for d in domains[1:])]
    for ax, label in zip(axes[0], labels):
        mine = [base, *sorted((r for r in rows if r["label"] == label), key=lambda r: r["step"])]
        for i, d in enumerate(domains):
            points = [(r["step"], r["bpb"][d]) for r in mine if d in r["bpb"]]
            ax.plot(*zip(*points), marker="o", color=f"C{i}", label=d)
            ax.axhline(reference[d], color=f"C{i}", ls="--", lw=0.8)
        ax.set_xticks(range(len(steps)), steps)
        ax.set(title=label, xlabel="after step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation bits per byte")
    axes[0][0].legend()
    fig.suptitle("bpb of every domain after each step (dashed: the domain's scratch expert; lower is better)")
    _save(fig, Path(path))
    return Path(path)


def write_growth_report(out: Path, results: dict) -> None:
    """`report.md` of a growth study: one table (strategy × step) and `growth.png`."""
    import json

    cfg, rows = results["config"], results["models"]
    domains = [cfg["old_domain"], cfg["new_domain"], *cfg["grow"]]
    tokens = cfg["adapt_tokens"][0] if isinstance(cfg["adapt_tokens"], list) else cfg["adapt_tokens"]
    checked = list(dict.fromkeys(d for r in rows for d in r["validity_ceiling"]))
    table = []
    for r in rows:
        acc = r["domain_accuracy"] or {}
        row = {"model": r["label"], "seed": r["seed"], "step": "-" if r["step"] is None else f"{r['step']}: {'+' * bool(r['step'])}{r['added']}",
               **{f"bpb {d}": r["bpb"].get(d) for d in domains},
               **{f"forgetting {d}": _pct(r["forgetting_rel"].get(d)) for d in domains[:-1]},
               **{f"gap {d}": _pct(r["gap"].get(d)) for d in domains}}
        for d in checked:
            row[f"{d} valid"] = r["validity"].get(d)
            row[f"{d} ceiling"] = r["validity_ceiling"].get(d)
        row.update({f"ctrl acc {d}": acc.get(d) for d in domains})
        row.update({"trainable": r["trainable_params"], "total": r["total_params"], "tokens": r["tokens"],
                    "minutes": None if r["seconds"] is None else round(r["seconds"] / 60, 2)})
        table.append(row)
    first = [r for r in rows if r["seed"] == cfg["seeds"][0]]
    plot_growth(first, domains, out / "growth.png")
    samples = {r["model"]: read_json(out / r["model"] / SUITE).get("samples", {}) for r in rows}
    write_text(out / "samples.json", json.dumps(samples, indent=1, ensure_ascii=False))
    lines = [f"# expandlm growth study: {' → +'.join(domains)} ({cfg['preset']} preset)", "",
             f"Base: a {domains[0]} expert trained on {cfg['base_tokens']:,} tokens (step 0). Every strategy then "
             f"adds {', then '.join(domains[1:])}, each step adapting the previous step's model on "
             f"{tokens:,} tokens of the added domain. Each domain has a scratch expert (the base, for "
             f"{domains[0]}; the others at {tokens:,} tokens). bpb: bits per byte on each served "
             "domain's validation set (- : not served yet). forgetting: relative change of a domain's bpb since the "
             "step that added it. gap: bpb against the domain's scratch expert. valid: share of samples passing the "
             "domain's structural check and ending before the context limit; ceiling: the same share of real "
             "validation documents. ctrl acc: share of samples a held-out classifier assigns to the requested domain.",
             "", markdown_table(table, list(table[0])), "", "![growth](growth.png)", "", "## Samples", "",
             "One sample per domain of each strategy's last step; all of them are in `samples.json`.", ""]
    for r in first:
        if r["step"] == len(domains) - 1:
            for domain, drawn in samples[r["model"]].items():
                lines += [f"### {r['label']}: {domain}", "", "```", drawn[0]["text"] if drawn else "", "```", ""]
    write_text(out / "report.md", "\n".join(lines))


def plot_combine(rows: list[dict], domains: list[str], path: Path) -> Path:
    """Each way of combining the experts: its bpb gap to each domain's expert, and the control accuracy of
    its samples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [r["label"] for r in rows]
    fig, (ax_gap, ax_acc) = plt.subplots(1, 2, figsize=(15, 0.32 * len(rows) + 2.2), sharey=True)
    y = np.arange(len(rows))
    height = 0.8 / len(domains)
    for i, d in enumerate(domains):
        gaps = [r["gap"].get(d, np.nan) for r in rows]
        ax_gap.barh(y + (i - (len(domains) - 1) / 2) * height, np.clip(gaps, -50, 150), height, label=d)
    ax_gap.axvline(0, color="black", lw=0.8)
    ax_gap.set(xlabel="bpb gap to the domain's expert (%, clipped at 150)", title="bpb on every domain")
    ax_gap.set_yticks(y, labels, fontsize=8)
    ax_gap.invert_yaxis()
    acc = [r["mean_accuracy"] if r["mean_accuracy"] is not None else np.nan for r in rows]
    ax_acc.barh(y, acc, 0.6, color="tab:gray")
    ax_acc.set(xlabel="domain-control accuracy of samples (mean over domains)", xlim=(0, 1), title="samples")
    for ax in (ax_gap, ax_acc):
        ax.grid(axis="x", alpha=0.3)
    ax_gap.legend(loc="lower right")
    _save(fig, Path(path))
    return Path(path)


def write_combine_report(out: Path, results: dict) -> None:
    """`report.md` of the combination study (combine.py): one table, `combine.png`, samples."""
    import json

    domains, rows = results["domains"], results["models"]
    cfg = results["config"]
    table = []
    for r in rows:
        row = {"model": r["label"], "kind": r["family"], "from": r["base"]}
        for d in domains:
            bpb, gap = r["bpb"].get(d), r["gap"].get(d)
            row[f"{d} bpb (gap)"] = "-" if bpb is None else f"{bpb:.3f} ({gap:+.1f}%)"
        acc = r["domain_accuracy"] or {}
        row["ctrl acc " + "/".join(d[:4] for d in domains)] = (
            "/".join("-" if acc.get(d) is None else f"{acc[d]:.2f}" for d in domains) if acc else "-")
        row.update({"trained": r["trained_params"], "stored": r["stored_params"],
                    "minutes": None if r["seconds"] is None else round(r["seconds"] / 60, 1)})
        table.append(row)
    plot_combine(rows, domains, out / "combine.png")
    samples = {r["label"]: r.get("samples", {}) for r in rows if r.get("samples")}
    write_text(out / "samples.json", json.dumps(samples, indent=1, ensure_ascii=False))
    routed = next((r for r in rows if "routing_accuracy" in r), None)
    lines = [f"# expandlm: combining experts ({cfg['preset']} preset, seed {cfg['seed']})", "",
             f"Common start: a {cfg['base_domain']} expert ({cfg['base_tokens']:,} tokens). Each of "
             f"{', '.join(cfg['experts'])} is fine-tuned from it once on {cfg['expert_tokens']:,} tokens, fully and "
             "as a LoRA adapter; every row then serves every domain. bpb: bits per byte on each domain's validation "
             "set, with the gap to that domain's expert (the base for "
             f"{cfg['base_domain']}, the full fine-tune for the others). ctrl acc: share of samples for each domain "
             "that a held-out classifier assigns to it. trained: parameters the row's own step trained (a merge: 0, "
             "on top of its experts); stored: parameters kept to serve it; minutes: its training, its experts' "
             "included, and the merge.", ""]
    if routed:
        lines += [f"The per-request router sent {100 * routed['routing_accuracy']:.1f}% of the validation documents "
                  f"(their first {cfg['routing_chars']} characters) to their own domain's expert.", ""]
    lines += [markdown_table(table, list(table[0])), "", "![combine](combine.png)", "", "## Samples", "",
              "The first sample per domain of a few rows; all of them are in `samples.json`.", ""]
    for label, by_domain in list(samples.items())[:6]:
        for domain, drawn in by_domain.items():
            lines += [f"### {label}: {domain}", "", "```", drawn[0]["text"][:400] if drawn else "", "```", ""]
    write_text(out / "report.md", "\n".join(lines))
