"""Per-block importance charts (PNG bytes for ``CompressionRecord.artifacts``).

Drawn on a bare Agg canvas: no pyplot state, no global backend switch, no display needed.
"""

from __future__ import annotations

import io


def importance_chart(rounds: list[dict], title: str, ylabel: str) -> bytes:
    """One line per scoring round over the original block indices, the removed blocks marked.

    ``rounds``: ``[{"blocks": [original index], "scores": [score], "removed": [original index]}]``.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for n, r in enumerate(rounds):
        color = colormaps["viridis"](n / max(len(rounds) - 1, 1))
        label = f"round {n + 1}" if len(rounds) > 1 else None
        ax.plot(r["blocks"], r["scores"], marker=".", color=color, label=label)
        picked = [(b, s) for b, s in zip(r["blocks"], r["scores"]) if b in set(r["removed"])]
        if picked:
            ax.scatter(*zip(*picked), marker="x", s=60, color="red", zorder=3)
    values = [v for r in rounds for v in r["scores"]]
    if min(values) > 0 and max(values) / min(values) > 20:  # e.g. skipping the first block of a LM
        ax.set_yscale("log")
    ax.set_xlabel("block (original index); x = removed")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if 1 < len(rounds) <= 12:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
