"""Reports: results people compare as a markdown table and a plot."""
from __future__ import annotations

from pathlib import Path


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


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Training loss and validation bpb against tokens seen, one line per run."""
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
    ax_bpb.set(xlabel="tokens seen", ylabel="validation bits per byte", title="validation bpb")
    for ax in (ax_loss, ax_bpb):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
