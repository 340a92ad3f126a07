"""Per-block importance charts (PNG bytes for ``CompressionRecord.artifacts``), and the figure
every chart of the package is drawn on (:func:`new_figure`).

Drawn on a bare Agg canvas: no pyplot state, no global backend switch, no display needed.
"""

from __future__ import annotations

import io


def new_figure(figsize: tuple[float, float], dpi: float | None = None):
    """A matplotlib ``Figure`` on its own Agg canvas (``dpi`` None: matplotlib's default).

    Never pyplot nor ``matplotlib.use``: the process's backend stays what it was, nothing is
    registered globally, and the figure is freed with its last reference (no ``close``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig, **savefig_kwargs) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    return buf.getvalue()


def importance_chart(rounds: list[dict], title: str, ylabel: str) -> bytes:
    """One line per scoring round over the original block indices, the removed blocks marked.

    ``rounds``: ``[{"blocks": [original index], "scores": [score], "removed": [original index]}]``.
    """
    from matplotlib import colormaps

    fig = new_figure((8, 4.5), dpi=100)
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
    return png_bytes(fig)
