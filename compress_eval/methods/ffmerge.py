"""Merging feed-forward sublayers (Verma et al.): align, average and tie a window of adjacent FFs.

For a window of k+1 adjacent layers, each FF sublayer's hidden neurons are permuted to match an
anchor's (correlation of their activations, linear assignment), the aligned sublayers are averaged,
and every layer of the window then uses that ONE module: k FF sublayers' parameters are gone from
memory and, saved as one copy plus a tie map, from disk. The window is the best of a sliding-window
search scored by perplexity on calibration windows (features are collected once for all windows).
With ``--num-windows W`` the removed sublayers are split over W separate windows, searched one after
another on the model as merged so far (largest first, none overlapping).

After sublayer pruning some blocks have no FF sublayer left: a window is then adjacent FF sublayers of
the blocks that still have one (the attention-only blocks between them are passed over), so merging
composes with ``sublayer`` in either order.
"""

from __future__ import annotations

import copy
from dataclasses import replace
import math
import re
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from compress_eval.config import MethodOptions
from compress_eval.errors import UserError
from compress_eval.methods import alignment
from compress_eval.methods.base import CompressionRecord, Compressor
from compress_eval.methods.ffmerge_charts import linear_cka_matrix, render_cka, render_window_scores
from compress_eval.methods.registry import register_method
from compress_eval.models.adapters import Adapter
from compress_eval.models.loading import untie
from compress_eval.progress import bar
from compress_eval.scoring.prefix import PrefixStates


class MergeOptions(MethodOptions):
    num_merge: int | None = Field(None, ge=1, description="FF sublayers removed: a window of num_merge+1 layers")
    ff_fraction: float | None = Field(None, gt=0, lt=1, description="fraction of FF sublayers removed, e.g. 0.333")
    anchor: Literal["first", "middle", "last"] = Field("first", description="layer the others are aligned to")
    permute: bool = Field(True, description="align neurons before averaging (--no-permute: the paper's vanilla)")
    features: Literal["product", "up"] = Field(
        "product", description="SwiGLU neuron features: act(gate)*up (paper appendix) or up_proj output (code)")
    window: str = Field("auto", description="'auto' (sliding-window search) or first-last layer, e.g. 10-16")
    window_stride: int = Field(1, ge=1, description="score every n-th start of the sliding search (1: all)")
    num_windows: int = Field(1, ge=1, description="merge the FF sublayers removed in this many separate windows "
                                                  "(each searched in turn, largest first, none overlapping)")
    feature_tokens: int = Field(10_000, ge=2, description="calibration tokens for the neuron correlations")
    score_samples: int | None = Field(None, ge=1, description="calibration windows scoring each candidate (default all)")
    cka_tokens: int = Field(1024, ge=2, description="tokens for the FF-output CKA chart")
    untied_export: bool = Field(False, description="store every layer's copy (plain checkpoint for --model hf)")

    @field_validator("ff_fraction", mode="before")
    @classmethod
    def _fraction_syntax(cls, v):
        """Accept 1/3 as well as 0.333 (the paper states its ratios as fractions)."""
        if isinstance(v, str) and re.fullmatch(r"\s*\d+\s*/\s*\d+\s*", v):
            num, den = (int(x) for x in v.split("/"))
            return num / den if den else v
        return v

    @field_validator("window")
    @classmethod
    def _window_syntax(cls, v):
        if v != "auto" and not re.fullmatch(r"\d+-\d+", v):
            raise ValueError(f"window must be 'auto' or FIRST-LAST (e.g. 10-16), got {v!r}")
        if v != "auto" and int(v.split("-")[1]) <= int(v.split("-")[0]):
            raise ValueError(f"window {v}: LAST must be greater than FIRST")
        return v

    @model_validator(mode="after")
    def _one_amount(self):
        if self.num_merge is not None and self.ff_fraction is not None:
            raise ValueError("give num_merge or ff_fraction, not both")
        if self.num_windows > 1 and self.window != "auto":
            raise ValueError("--num-windows searches its windows: leave --window at auto")
        return self

    def window_sizes(self, num_layers: int) -> list[int]:
        """Layers of each window, largest first: the removed FF sublayers split as evenly as can be."""
        removed = self.window_size(num_layers) - 1
        if self.num_windows > removed:
            raise UserError(f"--num-windows {self.num_windows} needs at least one FF sublayer removed per window, "
                            f"and {removed} are: lower --num-windows or merge more")
        per, extra = divmod(removed, self.num_windows)
        sizes = [per + 1 + (w < extra) for w in range(self.num_windows)]
        if sum(sizes) > num_layers:
            raise UserError(f"{self.num_windows} windows of {sizes} layers do not fit in {num_layers} layers: "
                            f"lower --num-windows")
        return sizes

    def window_size(self, num_layers: int) -> int:
        """Number of FF sublayers in the merged window (removed ones + the one kept)."""
        if self.window != "auto":
            first, last = map(int, self.window.split("-"))
            removed = last - first
            if (self.num_merge not in (None, removed)
                    or (self.ff_fraction is not None and self._from_fraction(num_layers) != removed)):
                raise UserError(f"window {self.window} removes {removed} FF sublayers, which contradicts "
                                f"--num-merge/--ff-fraction: give only one of them")
        elif self.num_merge is not None:
            removed = self.num_merge
        elif self.ff_fraction is not None:
            removed = self._from_fraction(num_layers)
        else:  # the pipeline fills in the default (1/3) before this: only a direct use gets here
            raise UserError("give --num-merge K, --ff-fraction F, --param-sparsity F or an explicit --window "
                            "FIRST-LAST")
        if not 1 <= removed < num_layers:
            raise UserError(f"merging away {removed} of {num_layers} FF sublayers is impossible: "
                            f"use 1..{num_layers - 1}")
        return removed + 1

    def _from_fraction(self, num_layers: int) -> int:
        return math.ceil(round(num_layers * self.ff_fraction, 6))


def anchor_index(layers: list[int], anchor: str) -> int:
    return layers[{"first": 0, "middle": (len(layers) - 1) // 2, "last": -1}[anchor]]


def ff_layers(adapter: Adapter) -> list[int]:
    """The blocks that still have their FF sublayer (sublayer pruning may have removed some)."""
    return [j for j in range(adapter.num_blocks) if adapter.has_sublayer(j, "mlp")]


def align_window(features: alignment.FFFeatures, layers: list[int], anchor: int, permute: bool, device=None):
    """Per layer of the window: (permutation onto the anchor or None, mean matched correlation)."""
    plan = {}
    for j in layers:
        if j == anchor:
            plan[j] = (None, 1.0)
            continue
        za, zb = features.hidden[anchor], features.hidden[j]
        if permute:
            plan[j] = alignment.match_neurons(alignment.correlation(za, zb, device))
        else:  # vanilla: neurons paired by index; the same quality measure, for comparison
            plan[j] = (None, alignment.identity_correlation(za, zb))
    return plan


@torch.no_grad()
def merged_ff(adapter: Adapter, layers: list[int], plan: dict) -> torch.nn.Module:
    """One FF module whose every tensor is the mean of the window's aligned tensors (fp32 math)."""
    blocks = adapter.blocks
    with adapter.hold(layers):
        states = [alignment.aligned_ff_state(adapter, blocks[j], plan[j][0]) for j in layers]
        mean = {k: torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype) for k in states[0]}
        module = copy.deepcopy(adapter.mlp(blocks[layers[0]]))
    module.load_state_dict(mean)
    return module


def tie_window(adapter: Adapter, layers: list[int], module: torch.nn.Module) -> dict[str, str]:
    """Make every layer of the window use ``module``; the tie map {module path: canonical path}."""
    with adapter.hold(layers, write=True):
        for j in layers:
            adapter.set_mlp(adapter.blocks[j], module)
    return {adapter.mlp_path(j): adapter.mlp_path(layers[0]) for j in layers[1:]}


class WindowScorer:
    """Calibration perplexity of the model with one window's FFs replaced by a merged module.

    Blocks before the window are untouched, so each candidate runs only from the cached hidden
    state entering its first block (the same saving as the layer-removal scorers).
    """

    def __init__(self, adapter: Adapter, windows: torch.Tensor):
        self.adapter = adapter
        self.prefix = PrefixStates(adapter, windows, batch_size=1, store="cpu")

    @torch.no_grad()
    def ppl(self, layers: list[int], module: torch.nn.Module) -> float:
        blocks = self.adapter.blocks
        originals = [self.adapter.mlp(blocks[j]) for j in layers]
        for j in layers:
            self.adapter.set_mlp(blocks[j], module)
        try:
            return self.prefix.ppl(self.prefix.suffix_nll(layers[0]))
        finally:
            for j, original in zip(layers, originals):
                self.adapter.set_mlp(blocks[j], original)


@register_method
class MergeFF(Compressor):
    name = "merge"
    options_class = MergeOptions
    ties_modules = True
    runs_partial_blocks = True  # windows of the blocks that still have an FF sublayer
    default_amount = {"options": {"ff_fraction": 1 / 3}}  # the paper's headline: 1/3 of the FF sublayers

    summary = "align (permute), average and tie a window of adjacent FF sublayers (Verma et al.)"

    @classmethod
    def given_amount(cls, cfg) -> dict:
        """--param-sparsity, or the FF sublayers to merge: --num-merge, --ff-fraction or an explicit --window."""
        o = cfg.options
        said = {key: o.get(key) for key in ("num_merge", "ff_fraction") if o.get(key) is not None}
        if o.get("window", "auto") != "auto":
            said["window"] = o["window"]
        return {**({} if cfg.param_sparsity is None else {"param_sparsity": cfg.param_sparsity}), **said}

    def memory_shape(self, blocks: int) -> dict:
        """One window of FF sublayers averaged at a time, from features of the scored windows."""
        o, calib_samples = self.options, self.cfg.calib_samples
        return {"kind": "merge", "remove_blocks": 0,
                "score_samples": min(o.score_samples or calib_samples, calib_samples), "merge_window": o.window_sizes(blocks)[0], "feature_tokens": o.feature_tokens,
                "cka_tokens": o.cka_tokens, "permute": o.permute}

    def compress(self, adapter, calib) -> CompressionRecord:
        o: MergeOptions = self.options
        if any(v is not None for v in (self.cfg.sparsity, self.cfg.num_blocks, self.cfg.blocks)):
            raise UserError("method 'merge' removes FF sublayers, not blocks: use --num-merge, --ff-fraction or "
                            "--param-sparsity instead of --sparsity/--num-blocks/--blocks")
        n, ffs = adapter.num_blocks, ff_layers(adapter)
        if not ffs:
            raise UserError("method 'merge' ties FF sublayers, and every block of this model has lost its own: "
                            "choose another method")
        if self.cfg.param_sparsity is not None:
            o = o.model_copy(update={"num_merge": self.ff_to_merge(adapter, ffs)})
        sizes = o.window_sizes(len(ffs))
        device = adapter.device
        features = alignment.collect_ff_features(adapter, calib, o.features, o.feature_tokens, o.cka_tokens,
                                                 layers=ffs)
        tie_map, windows, taken, ff_params = {}, [], set(), 0
        for number, size in enumerate(sizes, 1):
            if o.window == "auto":
                runs = [ffs[s: s + size] for s in range(0, len(ffs) - size + 1, o.window_stride)]
                runs = [r for r in runs if not taken & set(r)]
            else:
                first, last = map(int, o.window.split("-"))
                if last >= n:
                    raise UserError(f"window {o.window} is outside the model's layers 0..{n - 1}")
                runs = [list(range(first, last + 1))]
                if missing := sorted(set(runs[0]) - set(ffs)):
                    raise UserError(f"window {o.window} holds blocks {missing}, whose FF sublayer was removed: "
                                    f"choose a window of blocks that have theirs, or --window auto")
            if not runs:
                raise UserError(f"no room left for window {number} of {size} layers beside {sorted(taken)}: "
                                f"lower --num-windows or --window-stride")
            layers, plan, candidates = self.search(adapter, calib, features, runs, device,
                                                   f"merge: window {number}/{len(sizes)} search"
                                                   if len(sizes) > 1 else "merge: window search")
            module = merged_ff(adapter, layers, plan)
            tie_map.update(tie_window(adapter, layers, module))
            ff_params += sum(p.numel() for p in module.parameters()) * (len(layers) - 1)
            taken |= set(layers)
            windows.append({
                "window": [layers[0], layers[-1]],
                "layers": layers,
                "window_size": len(layers),
                "anchor": anchor_index(layers, o.anchor),
                "mean_matched_correlation": {str(j): round(plan[j][1], 4) for j in layers},
                "candidates": candidates,
            })
        cka = linear_cka_matrix(features.outputs)
        details = {
            **windows[0],  # the first (largest) window's record under the keys a one-window run has
            "windows": windows,
            "ff_removed": sum(w["window_size"] - 1 for w in windows),
            "ff_params_removed": ff_params if not o.untied_export else 0,
            "permute": o.permute,
            "features": o.features,
            "feature_tokens": features.hidden[0].size(0),
            "ff_output_cka": [[round(v, 4) for v in row] for row in cka.tolist()],
        }
        artifacts = {"ffmerge_windows.png": render_window_scores(windows[0]["candidates"], windows[0]["window"]),
                     "ffmerge_cka.png": render_cka(cka, windows[0]["window"])}
        artifacts.update({f"ffmerge_windows{k}.png": render_window_scores(w["candidates"], w["window"])
                          for k, w in enumerate(windows[1:], 2)})
        return CompressionRecord(tie_map=tie_map, details=details, artifacts=artifacts)

    def ff_to_merge(self, adapter, ffs: list[int]) -> int:
        """FF sublayers whose tying removes --param-sparsity of the blocks' parameters (rounded up)."""
        o = self.options
        if o.num_merge is not None or o.ff_fraction is not None or o.window != "auto":
            raise UserError("give method 'merge' one amount: --param-sparsity, or --num-merge / --ff-fraction / "
                            "--window")
        ff = adapter.sublayer_parameters(ffs[0], "mlp")
        return math.ceil(round(self.cfg.param_sparsity * adapter.block_parameters() / ff, 6))

    def search(self, adapter, calib, features, runs, device, label):
        """(layers, alignment plan, scored candidates) of the window with the lowest calibration
        perplexity among ``runs`` (each a list of layers), merged on the model as it is now."""
        o = self.options
        scorer = WindowScorer(adapter, calib[: o.score_samples])
        candidates, best = [], None
        for layers in bar(runs, label, unit="window"):
            plan = align_window(features, layers, anchor_index(layers, o.anchor), o.permute, device)
            ppl = scorer.ppl(layers, merged_ff(adapter, layers, plan))
            candidates.append({"window": [layers[0], layers[-1]], "calib_ppl": round(ppl, 4)})
            if best is None or ppl < best[0]:
                best = (ppl, layers, plan)
        del scorer
        return best[1], best[2], candidates

    def finish(self, adapter, record: CompressionRecord) -> CompressionRecord:
        """--untied-export, after the recovery stage trained the tied module: every layer gets its
        own copy (larger, but plain transformers loads it)."""
        if not self.options.untied_export or not record.tie_map:
            return record
        layers = [j for w in record.details["windows"] for j in w["layers"]]
        with adapter.hold(layers, write=True):
            untie(adapter.model, record.tie_map)
        return replace(record, tie_map={})
