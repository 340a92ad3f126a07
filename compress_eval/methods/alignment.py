"""Permutation alignment of feed-forward sublayers (Verma et al., Sec. 3.2 and Appendix A).

An FF sublayer's hidden neurons can be reordered without changing its function: permute the rows
of the "in" linears (up / gate, or GPT-2's c_fc and its bias) and the columns of the "out" linear
(down / c_proj) by the same permutation. Two sublayers are aligned by correlating their hidden
activations on the same tokens and solving the assignment problem that maximises total correlation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from compress_eval.models.adapters import Adapter, from_out_in, out_in
from compress_eval.progress import bar

STD_FLOOR = 1e-7  # the paper's clip of the standard deviation (dead neurons would divide by 0)


@dataclass
class FFFeatures:
    """Per layer: standardized hidden-neuron activations (tokens, d_ff) and raw FF outputs (for CKA)."""

    hidden: list[torch.Tensor]
    outputs: list[torch.Tensor]


def ff_roles(adapter: Adapter) -> tuple[list[str], str]:
    """The FF linears whose *outputs* index the hidden neurons, and the one whose *inputs* do."""
    return (["gate", "up"], "down") if adapter.is_gated_mlp else (["fc1"], "fc2")


def _feature_module(adapter: Adapter, block: nn.Module, kind: str) -> tuple[nn.Module, bool]:
    """(module, read its input?) for the activations that index the hidden neurons.

    GPT-2: c_fc's output, before the activation. SwiGLU: act(gate) * up, i.e. the input of down
    (the paper's appendix), or the up projection's output (``kind="up"``, the authors' code).
    """
    if not adapter.is_gated_mlp:
        return adapter.linear(block, "fc1"), False
    if kind == "up":
        return adapter.linear(block, "up"), False
    return adapter.linear(block, "down"), True


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per column, in fp32, std clipped at STD_FLOOR."""
    x = x.float()
    return (x - x.mean(0)) / x.std(0).clamp_min(STD_FLOOR)


@torch.no_grad()
def collect_ff_features(adapter: Adapter, calib: torch.Tensor, kind: str = "product",
                        max_tokens: int = 10_000, output_tokens: int = 2048,
                        store_dtype: torch.dtype = torch.float16, layers: list[int] | None = None) -> FFFeatures:
    """One pass over the first ``max_tokens`` calibration tokens, hooks on every FF sublayer (or on
    those of ``layers``; the others' entries stay empty).

    Hidden activations are gathered in bf16 (fp16 could overflow on massive activations) and then
    standardized layer by layer into ``store_dtype``: 30 layers x 10k tokens x 1536 neurons would
    be 1.8 GB in fp32. FF outputs are kept for the first ``output_tokens`` tokens only, enough for
    a CKA map.
    """
    model = adapter.model
    device = adapter.device
    seqlen = calib.size(1)
    windows = calib[: max(1, -(-max_tokens // seqlen))]
    hidden: list[list[torch.Tensor]] = [[] for _ in range(adapter.num_blocks)]
    outputs: list[list[torch.Tensor]] = [[] for _ in range(adapter.num_blocks)]
    handles = []
    for i, block in enumerate(adapter.blocks):
        if layers is not None and i not in layers:
            continue
        module, use_input = _feature_module(adapter, block, kind)

        def grab_hidden(mod, args, out, i=i, use_input=use_input):
            x = args[0] if use_input else out
            hidden[i].append(x.reshape(-1, x.size(-1)).to(torch.bfloat16).cpu())

        def grab_output(mod, args, out, i=i):
            if sum(o.size(0) for o in outputs[i]) < output_tokens:
                outputs[i].append(out.reshape(-1, out.size(-1)).float().cpu())

        handles.append(module.register_forward_hook(grab_hidden))
        handles.append(adapter.mlp(block).register_forward_hook(grab_output))
    try:
        for w in bar(windows, "FF features", unit="window", leave=False):
            model(input_ids=w[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    standardized = []
    for i in range(len(hidden)):  # one layer at a time, so only one fp32 copy exists at once
        standardized.append(standardize(torch.cat(hidden[i])[:max_tokens]).to(store_dtype) if hidden[i]
                            else torch.empty(0))
        hidden[i] = []
    return FFFeatures(hidden=standardized,
                      outputs=[torch.cat(o)[:output_tokens] if o else torch.empty(0) for o in outputs])


def correlation(za: torch.Tensor, zb: torch.Tensor, device: torch.device | str | None = None,
                chunk: int = 4096) -> torch.Tensor:
    """C_ab = cov(a, b) / (std_a std_b) from standardized features (tokens, d): a (d, d) matrix on
    the CPU, computed on ``device`` (the model's: 10k x 11008 features are TFLOPs per pair)."""
    n = za.size(0)
    c = torch.zeros(za.size(1), zb.size(1), device=device)
    for s in range(0, n, chunk):
        c += za[s: s + chunk].to(device).float().T @ zb[s: s + chunk].to(device).float()
    return (c / max(n - 1, 1)).cpu()


def identity_correlation(za: torch.Tensor, zb: torch.Tensor) -> float:
    """Mean correlation of neuron a with neuron a (the unaligned pairing), without the d x d matrix."""
    return float((za.float() * zb.float()).sum(0).mean() / max(za.size(0) - 1, 1))


def match_neurons(corr: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The permutation pi maximising sum_a C[a, pi(a)] and the mean matched correlation.

    ``pi[a]`` is the neuron of the other layer that takes the place of the anchor's neuron ``a``.
    """
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    perm = torch.as_tensor(cols[rows.argsort()], dtype=torch.long)
    return perm, float(corr[torch.arange(corr.size(0)), perm].mean())


def aligned_ff_state(adapter: Adapter, block: nn.Module, perm: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The FF sublayer's state dict with its hidden neurons reordered by ``perm`` (None: as is)."""
    mlp = adapter.mlp(block)
    state = {k: v.detach() for k, v in mlp.state_dict().items()}
    if perm is None:
        return state
    conv1d = adapter.family.conv1d
    writers, reader = ff_roles(adapter)
    out = dict(state)
    for role in writers + [reader]:
        name = adapter.mlp_linear_path(role)
        reads = role == reader
        w = out_in(state[f"{name}.weight"], conv1d)
        idx = perm.to(w.device)
        # The neurons index the reader's inputs and the writers' outputs (rows and bias).
        out[f"{name}.weight"] = from_out_in(w.index_select(1 if reads else 0, idx), conv1d)
        if not reads and f"{name}.bias" in state:
            out[f"{name}.bias"] = state[f"{name}.bias"].index_select(0, idx)
    return out


def permute_ff_(adapter: Adapter, block: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the hidden neurons of one FF sublayer in place (the function is unchanged)."""
    adapter.mlp(block).load_state_dict(aligned_ff_state(adapter, block, perm))
