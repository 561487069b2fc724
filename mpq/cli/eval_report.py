"""Per-position report of ``mpq eval``: the bucket table and the optional PNG (matplotlib)."""
from __future__ import annotations

from rich.table import Table

from mpq.cli.plotting import pyplot, save_figure

def bucket_label(bucket: dict) -> str:
    return f"{_short(bucket['start'])}–{_short(bucket['end'])}"


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 2048 and n % 1024 == 0 else str(n)


def position_table(result: dict) -> Table:
    """One row per position bucket: tokens, mean NLL, ppl (and KL, top-1, reference ppl)."""
    compared = "kl_mean" in result
    table = Table(title="by position in the window (text tokens)", title_justify="left")
    for name in ("positions", "tokens", "mean NLL", "ppl") + (
            ("ref ppl", "mean KL", "top-1") if compared else ()):
        table.add_column(name, justify="left" if name == "positions" else "right")
    for b in result["by_position"]:
        cells = [bucket_label(b), str(b["tokens"]), f"{b['nll_mean']:.4f}", f"{b['ppl']:.4f}"]
        if compared:
            cells += [f"{b['ref_ppl']:.4f}", f"{b['kl_mean']:.5f}", f"{b['top1_agreement']:.4f}"]
        table.add_row(*cells)
    return table


def plot_positions(result: dict, path: str) -> None:
    """PNG of mean NLL by position bucket (and the reference's, with mean KL on a second axis,
    when the result compares against a reference)."""
    plt = pyplot()
    buckets = result["by_position"]
    x = list(range(len(buckets)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [b["nll_mean"] for b in buckets], marker="o", label="mean NLL")
    if "kl_mean" in result:
        import math

        ax.plot(x, [math.log(b["ref_ppl"]) for b in buckets], marker="s", linestyle="--",
                label="reference mean NLL")
        kl_ax = ax.twinx()
        kl_ax.plot(x, [b["kl_mean"] for b in buckets], marker="^", color="tab:red",
                   label="mean KL")
        kl_ax.set_ylabel("mean KL to the reference (nats)")
        kl_ax.legend(loc="upper right")
    ax.set_xticks(x, [bucket_label(b) for b in buckets])
    ax.set_xlabel("text position in the window")
    ax.set_ylabel("mean NLL (nats/token)")
    ax.set_title(f"{result['model']}: window {result['protocol']['window']}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    save_figure(fig, path)
