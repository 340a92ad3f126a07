"""What FF merging shows a reader: each candidate window's score, and how similar the FF sublayers'
outputs are to each other (linear CKA, the paper's Figure 5), as PNG bytes for the run directory."""

from __future__ import annotations

import torch

from compress_eval.scoring.chart import new_figure, png_bytes


def linear_cka_matrix(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Linear CKA between every pair of layers' FF outputs, each (tokens, d) on the same tokens.

    Through centered token Gram matrices K = X X^T (Kornblith et al. 2019): CKA = <Kc, Lc> /
    (|Kc| |Lc|). With fewer tokens than channels this is far cheaper than the d x d form per pair. A
    layer without outputs (its FF sublayer removed) gets NaN in its row and column.
    """
    present = [i for i, x in enumerate(outputs) if x.numel()]
    grams = []
    for i in present:
        x = outputs[i].double() - outputs[i].double().mean(0)
        k = (x @ x.T).flatten()
        grams.append(k / k.norm().clamp_min(1e-12))
    g = torch.stack(grams)
    cka = torch.full((len(outputs), len(outputs)), float("nan"))
    index = torch.tensor(present)
    cka[index[:, None], index] = (g @ g.T).float()
    return cka


def _png(fig) -> bytes:
    return png_bytes(fig, dpi=110, bbox_inches="tight")


def _figure(size):
    fig = new_figure(size)
    return fig, fig.subplots()


def render_window_scores(candidates: list[dict], chosen: list[int]) -> bytes:
    """Calibration perplexity after merging, per candidate window (by its first layer)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _figure((6, 3.2))
    starts = [c["window"][0] for c in candidates]
    ppl = [c["calib_ppl"] for c in candidates]
    ax.plot(starts, ppl, marker="o")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axvline(chosen[0], color="tab:red", linestyle="--", label=f"chosen {chosen[0]}-{chosen[1]}")
    ax.set_xlabel("first layer of the merged window")
    ax.set_ylabel("calibration perplexity")
    if max(ppl) > 10 * min(ppl):
        ax.set_yscale("log")
    ax.legend()
    return _png(fig)


def render_cka(cka: torch.Tensor, chosen: list[int]) -> bytes:
    """Heat map of FF-output CKA between layers, the merged window outlined."""
    from matplotlib.patches import Rectangle

    fig, ax = _figure((5, 4.3))
    im = ax.imshow(cka.numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower")
    size = chosen[1] - chosen[0] + 1
    ax.add_patch(Rectangle((chosen[0] - 0.5, chosen[0] - 0.5), size, size, fill=False, edgecolor="red"))
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title("FF-output similarity (linear CKA)")
    fig.colorbar(im, ax=ax)
    return _png(fig)
