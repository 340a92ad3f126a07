"""FuseGPT's learnable layer fusion (paper eq. 5, 6 and 10), as one module that wraps a linear.

    W' = W + B A + sum_k (C_k D_k) ⊙ W_f,k

W (the layer's own weight) and every injected W_f,k (the same linear of a removed block) stay frozen;
the LoRA pair B A (B = 0 at start, no alpha scaling) and each coefficient pair C_k D_k (C = 0, D Kaiming)
are trained. Both zero starts make the fused layer compute exactly what the unfused one did, so the
fine-tune begins from the group without the removed block. An injection without a weight
(``frozen=None``) is the plain low-rank term C D: the control that has the same trainable parameters
but nothing injected.

Weights are handled as (out, in) whatever the storage; GPT-2's Conv1D keeps (in, out) and is
transposed back when materialized. Trainable factors live in fp32 and the effective weight is
computed in fp32, then cast to the activations' dtype (bf16 on CUDA loses nothing to the sum).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from compress_eval.models.adapters import out_in

ROW_CHUNK_BYTES = 32 * 2**20  # the fp32 piece of W' made at once (a 4096 x 14336 FF linear: 8 pieces)


def clamp_rank(rank: int, out_features: int, in_features: int) -> int:
    """A rank above min(out, in) adds nothing a full-rank factor could not: clamp it."""
    return max(1, min(rank, out_features, in_features))


def _kaiming(rows: int, cols: int, device, generator: torch.Generator | None) -> nn.Parameter:
    t = torch.empty(rows, cols, dtype=torch.float32, device=device)
    bound = 1.0 / math.sqrt(cols)  # kaiming_uniform_(a=sqrt(5)) on a (rows, cols) weight, as LoRA's A
    if generator is None:
        t.uniform_(-bound, bound)
    else:
        t.copy_(torch.rand(rows, cols, generator=generator) * 2 * bound - bound)
    return nn.Parameter(t)


class FusedLinear(nn.Module):
    """A frozen linear (nn.Linear or GPT-2 Conv1D) plus LoRA and injected, coefficient-weighted weights."""

    def __init__(self, base: nn.Module, conv1d: bool, lora_rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.conv1d = conv1d
        for p in base.parameters():
            p.requires_grad_(False)
        out_f, in_f = self.out_in
        device = base.weight.device
        self.lora_rank = clamp_rank(lora_rank, out_f, in_f) if lora_rank > 0 else 0
        if self.lora_rank:
            self.lora_A = _kaiming(self.lora_rank, in_f, device, generator)
            self.lora_B = nn.Parameter(torch.zeros(out_f, self.lora_rank, device=device))
        self.coef_C = nn.ParameterList()
        self.coef_D = nn.ParameterList()
        self.injected: list[torch.Tensor | None] = []  # frozen (out, in) weights, not parameters

    @property
    def out_in(self) -> tuple[int, int]:
        out_f, in_f = self.base_weight().shape
        return out_f, in_f

    def base_weight(self) -> torch.Tensor:
        return out_in(self.base.weight, self.conv1d)

    def inject(self, frozen: torch.Tensor | None, rank: int, generator: torch.Generator | None = None) -> int:
        """Add one (coefficient, frozen weight) pair (eq. 10 for a block fused before); returns the rank used."""
        out_f, in_f = self.out_in
        if frozen is not None and tuple(frozen.shape) != (out_f, in_f):
            raise ValueError(f"injected weight {tuple(frozen.shape)} does not match the layer's {(out_f, in_f)}")
        rank = clamp_rank(rank, out_f, in_f)
        device = self.base.weight.device
        self.coef_C.append(nn.Parameter(torch.zeros(out_f, rank, device=device)))
        self.coef_D.append(_kaiming(rank, in_f, device, generator))
        self.injected.append(None if frozen is None else frozen.detach())
        return rank

    def coefficient_parameters(self) -> list[nn.Parameter]:
        return list(self.coef_C) + list(self.coef_D)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B] if self.lora_rank else []

    def row_chunks(self) -> list[slice]:
        """Output rows in pieces of at most ROW_CHUNK_BYTES of fp32 W': a big model's FF linear is never
        whole in fp32, nor is its gradient (a small model's linear is one piece)."""
        out_f, in_f = self.out_in
        rows = max(1, ROW_CHUNK_BYTES // (4 * in_f))
        return [slice(start, min(start + rows, out_f)) for start in range(0, out_f, rows)]

    def effective_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        """Rows ``rows`` of W' in fp32, (out, in), summed in place into one fp32 copy of W's rows."""
        w = self.base_weight()[rows].to(torch.float32, copy=True)
        if self.lora_rank:
            w.addmm_(self.lora_B[rows], self.lora_A)
        for C, D, frozen in zip(self.coef_C, self.coef_D, self.injected):
            # frozen stays in its dtype: the product promotes to fp32 (the same values) and autograd
            # keeps the frozen weight itself for C and D's gradients, not an fp32 copy of it.
            if frozen is None:
                w.addmm_(C[rows], D)
            else:
                w.addcmul_(C[rows] @ D, frozen[rows])
        return w

    def _linear(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        bias = self.base.bias
        return F.linear(x, self.effective_weight(rows).to(x.dtype), None if bias is None else bias[rows].to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        # Training: keep only x for the backward pass and make each piece of W' again there, rather than
        # keep a weight-sized W' of every fused linear of the group until the backward pass reaches it.
        pieces = [checkpoint(self._linear, x, rows, use_reentrant=False) if training else self._linear(x, rows)
                  for rows in self.row_chunks()]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """The wrapped module with W' written into it (model dtype), a piece at a time: a plain Linear /
        Conv1D again."""
        weight = out_in(self.base.weight, self.conv1d)
        for rows in self.row_chunks():
            weight[rows].copy_(self.effective_weight(rows))
        return self.base


def fuse_linear(module: nn.Module, conv1d: bool, lora_rank: int, generator=None) -> FusedLinear:
    """Wrap a plain linear for fusion, or return it as is when it already is fused (fused again)."""
    return module if isinstance(module, FusedLinear) else FusedLinear(module, conv1d, lora_rank, generator)


def materialize_block(adapter, block: nn.Module) -> None:
    """Replace every FusedLinear of ``block`` by its plain module with the effective weight."""
    for role in adapter.linear_roles():
        module = adapter.linear(block, role)
        if isinstance(module, FusedLinear):
            adapter.set_linear(block, role, module.materialize())


def frozen_weight(adapter, block: nn.Module, role: str) -> torch.Tensor:
    """The (out, in) weight of a block about to be removed; a fused block is collapsed first."""
    module = adapter.linear(block, role)
    if isinstance(module, FusedLinear):
        module = module.materialize()
        adapter.set_linear(block, role, module)
    return adapter.weight_out_in(module).detach()
