"""Architecture adapters: the one place that knows where a family keeps its blocks and linears.

Methods never touch ``model.model.layers`` or ``transformer.h`` directly; they ask the adapter for
the blocks, for a block's linears by role (q/k/v/o, gate/up/down, fc1/fc2), and for a runner that
executes blocks one at a time on cached hidden states.

Running blocks one at a time needs the per-block keyword arguments current transformers passes
(``position_embeddings``, the causal / sliding-window mask, ``position_ids``). Rather than rebuild
them per family, :func:`capture_block_kwargs` records what the model itself passes to each block in
one forward pass; those tensors broadcast over the batch, so one capture per sequence length serves
every batch.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from compress_eval.errors import UserError
from compress_eval.models import offload
from compress_eval.models.sublayers import CACHE_ARGUMENTS, KINDS, is_skipped, skipped_module


@dataclass(frozen=True)
class Family:
    """Where one architecture family keeps its parts (dotted attribute paths).

    ``blocks`` and ``final_norm`` are paths in the model; every other path is inside one block.
    ``mlp_linears`` lie inside ``mlp`` (their paths start with it). ``norms`` lists the block's
    norm modules in the block's own module order (a non-parametric norm counts: it has no
    parameters to train). ``text_config`` names the decoder's config in a multimodal model's config.
    """

    name: str
    blocks: str
    final_norm: str
    attn_linears: dict[str, str]
    mlp_linears: dict[str, str]
    norms: tuple[str, ...]
    mlp: str = "mlp"
    attn: str = "self_attn"  # the attention sublayer (its linears lie inside it)
    text_config: str | None = None  # e.g. LLaVA keeps the decoder's config in config.text_config
    conv1d: bool = False  # GPT-2's Conv1D stores weights transposed (in, out)


_LLAMA_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_GATED_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_PRE_NORMS = ("input_layernorm", "post_attention_layernorm")  # before attention, before the MLP
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_SANDWICH_NORMS = _PRE_NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def _decoder(name: str, norms: tuple[str, ...], **kw) -> Family:
    """A LLaMA-layout decoder (model.layers, q/k/v/o and gate/up/down projections)."""
    return Family(name, "model.layers", "model.norm", _LLAMA_ATTN, _GATED_MLP, norms, **kw)


def _multimodal(name: str, norms: tuple[str, ...]) -> Family:
    """A LLaMA-layout decoder inside a vision-language wrapper (model.language_model)."""
    return Family(name, "model.language_model.layers", "model.language_model.norm", _LLAMA_ATTN, _GATED_MLP,
                  norms, text_config="text_config")


FAMILIES: dict[str, Family] = {
    "llama": _decoder("llama", _PRE_NORMS),
    "mistral": _decoder("mistral", _PRE_NORMS),
    "qwen2": _decoder("qwen2", _PRE_NORMS),
    "qwen3": _decoder("qwen3", _QK_NORMS + _PRE_NORMS),
    "olmo": _decoder("olmo", _PRE_NORMS),  # non-parametric LayerNorms
    "olmo2": _decoder("olmo2", _QK_NORMS + ("post_attention_layernorm", "post_feedforward_layernorm")),
    "gemma": _decoder("gemma", _PRE_NORMS),
    "gemma2": _decoder("gemma2", _SANDWICH_NORMS),
    "gemma3_text": _decoder("gemma3_text", _QK_NORMS + _SANDWICH_NORMS),
    "starcoder2": Family("starcoder2", "model.layers", "model.norm", _LLAMA_ATTN,
                         {"fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}, _PRE_NORMS),
    "gpt2": Family("gpt2", "transformer.h", "transformer.ln_f", {"qkv": "attn.c_attn", "o": "attn.c_proj"},
                   {"fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}, ("ln_1", "ln_2"), attn="attn", conv1d=True),
    "llava": _multimodal("llava", _PRE_NORMS),
    "llava_next": _multimodal("llava_next", _PRE_NORMS),
    "qwen2_vl": _multimodal("qwen2_vl", _PRE_NORMS),  # q/k/v biases, as Qwen2
    "gemma3": _multimodal("gemma3", _QK_NORMS + _SANDWICH_NORMS),
}


def is_multimodal(model_type: str | None) -> bool:
    """Whether a model type is a vision-language wrapper compressed through its language model
    (loaded with ``AutoModelForImageTextToText``): the families whose decoder config is nested."""
    family = FAMILIES.get(model_type)
    return family is not None and family.text_config is not None


def vision_modules(model: nn.Module) -> list[str]:
    """Paths of the modules beside a vision-language model's language model (vision tower, projector):
    compression leaves them as they are, the quantization stage included; [] for a text model."""
    if not is_multimodal(getattr(model.config, "model_type", None)):
        return []
    language_model = FAMILIES[model.config.model_type].blocks.rpartition(".")[0]  # model.language_model
    parent, _, name = language_model.rpartition(".")
    return [f"{parent}.{child}" for child, _ in _get(model, parent).named_children() if child != name]


# --- linears: plain nn.Linear or GPT-2's Conv1D ------------------------------------------------
def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (a linear whose weight is stored (in, out))."""
    # Without transformers imported no Conv1D can exist, so it is not imported here.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def is_linear(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` or GPT-2's ``Conv1D``: the linears methods and quantization handle."""
    return type(module) is nn.Linear or is_conv1d(module)


def out_in(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A linear's weight as (out_features, in_features) (a view; Conv1D stores it (in, out))."""
    return weight.t() if conv1d else weight


def from_out_in(weight_out_in: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """The inverse of :func:`out_in`: an (out, in) weight in the module's storage layout."""
    return weight_out_in.t() if conv1d else weight_out_in


def _get(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set(root: nn.Module, dotted: str, value) -> None:
    parent, _, last = dotted.rpartition(".")
    setattr(_get(root, parent) if parent else root, last, value)


class Adapter:
    """Family-specific access to one model instance."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        if model_type not in FAMILIES:
            supported = ", ".join(sorted(FAMILIES))
            raise UserError(
                f"unsupported architecture {model_type!r} ({type(model).__name__}); "
                f"supported model types: {supported}"
            )
        self.model = model
        self.family = FAMILIES[model_type]

    # --- structure -------------------------------------------------------------------------
    @property
    def text_config(self):
        cfg = self.model.config
        return getattr(cfg, self.family.text_config) if self.family.text_config else cfg

    def require_context(self, seqlen: int, flag: str) -> None:
        """Refuse windows longer than the positions the model has (an absurd --seqlen would otherwise
        run, allocating attention for it, until memory runs out)."""
        limit = getattr(self.text_config, "max_position_embeddings", None)
        if limit is not None and seqlen > limit:
            raise UserError(f"{flag} {seqlen} exceeds the model's context of {limit} tokens "
                            f"(max_position_embeddings): lower {flag}")

    @property
    def blocks(self) -> nn.ModuleList:
        return _get(self.model, self.family.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.family.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def is_gated_mlp(self) -> bool:
        return "gate" in self.family.mlp_linears

    def linear_roles(self) -> list[str]:
        return list(self.family.attn_linears) + list(self.family.mlp_linears)

    def linear_path(self, role: str) -> str:
        return {**self.family.attn_linears, **self.family.mlp_linears}[role]

    def linear(self, block: nn.Module, role: str) -> nn.Module:
        return _get(block, self.linear_path(role))

    def set_linear(self, block: nn.Module, role: str, module: nn.Module) -> None:
        _set(block, self.linear_path(role), module)

    def mlp_linear_path(self, role: str) -> str:
        """Path of an MLP linear inside the MLP module (its key prefix in the MLP's state dict)."""
        path = self.family.mlp_linears[role]
        if not path.startswith(self.family.mlp + "."):
            raise ValueError(f"{self.family.name}: MLP linear {path!r} is not inside {self.family.mlp!r}")
        return path.removeprefix(self.family.mlp + ".")

    def mlp(self, block: nn.Module) -> nn.Module:
        return _get(block, self.family.mlp)

    def set_mlp(self, block: nn.Module, module: nn.Module) -> None:
        _set(block, self.family.mlp, module)

    def mlp_path(self, i: int) -> str:
        """Dotted path of block ``i``'s MLP in the model (the names of its parameters start with it)."""
        return f"{self.family.blocks}.{i}.{self.family.mlp}"

    # --- sublayers: a block's attention and MLP, each removable (``models.sublayers``) ---------------
    def sublayer_name(self, kind: str) -> str:
        """The attribute path of a block's attention (``attn``) or MLP (``mlp``) sublayer."""
        if kind not in KINDS:
            raise ValueError(f"sublayer kind must be one of {KINDS}, got {kind!r}")
        return self.family.attn if kind == "attn" else self.family.mlp

    def sublayer_path(self, i: int, kind: str) -> str:
        """Dotted path of block ``i``'s sublayer in the model."""
        return f"{self.family.blocks}.{i}.{self.sublayer_name(kind)}"

    def has_sublayer(self, i: int, kind: str) -> bool:
        """Whether block ``i`` still has its ``kind`` sublayer (not removed)."""
        return not is_skipped(_get(self.blocks[i], self.sublayer_name(kind)))

    def sublayer_parameters(self, i: int, kind: str) -> int:
        """Parameters of block ``i``'s sublayer (its linears; offloaded placeholders count too)."""
        return sum(p.numel() for p in _get(self.blocks[i], self.sublayer_name(kind)).parameters())

    def block_parameters(self) -> int:
        """Parameters of the decoder's blocks (embeddings and head excluded): what --param-sparsity is a
        fraction of (offloaded placeholders count too; a tied module once)."""
        return sum(p.numel() for p in self.blocks.parameters())

    def skip_sublayer(self, i: int, kind: str) -> None:
        """Remove block ``i``'s ``kind`` sublayer for good: an empty module takes its place."""
        block = self.blocks[i]
        _set(block, self.sublayer_name(kind), skipped_module(kind, _get(block, self.sublayer_name(kind))))
        offloader = offload.offloader_of(self.model)
        if offloader is not None:
            offloader.forget_missing()

    @contextlib.contextmanager
    def sublayer_skipped(self, i: int, kind: str):
        """Context: block ``i`` runs without its ``kind`` sublayer (for scoring; put back on exit)."""
        block, name = self.blocks[i], self.sublayer_name(kind)
        original = _get(block, name)
        _set(block, name, skipped_module(kind, original))
        try:
            yield
        finally:
            _set(block, name, original)

    def skip_paths(self, paths: list[str]) -> None:
        """Put a checkpoint's removed sublayers (its manifest's ``skipped`` module paths) back in place on
        the model loaded from it, whatever the loader initialized there."""
        for path in paths:
            kind = next((k for k in KINDS if path.endswith("." + self.sublayer_name(k))), None)
            if kind is None or not path.startswith(self.family.blocks + "."):
                raise UserError(f"the manifest's removed sublayer {path!r} is not an attention or MLP of a "
                                f"{self.family.name} block: the checkpoint is damaged; compress it again")
            self.model.set_submodule(path, skipped_module(kind, self.model.get_submodule(path)))

    def norm_parameters(self, block: nn.Module) -> list[nn.Parameter]:
        """The parameters of a block's norms (weights, and biases where they have them), in module order."""
        return [p for path in self.family.norms for p in _get(block, path).parameters(recurse=False)]

    def weight_out_in(self, module: nn.Module) -> torch.Tensor:
        """A linear's weight as (out_features, in_features), whatever the family's storage layout."""
        return out_in(module.weight, self.family.conv1d)

    def linear_weight(self, block: nn.Module, role: str) -> torch.Tensor:
        """The weight of a block's linear by role, as (out_features, in_features)."""
        return self.weight_out_in(self.linear(block, role))

    # --- surgery ---------------------------------------------------------------------------
    def keep_blocks(self, keep: list[int]) -> None:
        """Keep only the given blocks (current indices, in order); fix indices and config.

        Renumbers every ``layer_idx`` (the KV cache is indexed by it), sets
        ``num_hidden_layers`` and trims ``layer_types`` so a reload and ``generate`` both see the
        new depth.
        """
        blocks = self.blocks
        if not keep:
            raise UserError("cannot remove every block: lower the sparsity or the number of blocks")
        if sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= len(blocks):
            raise ValueError(f"keep must be increasing indices in [0, {len(blocks)}), got {keep}")
        new = nn.ModuleList([blocks[i] for i in keep])
        for new_idx, block in enumerate(new):
            for module in block.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_idx
        _set(self.model, self.family.blocks, new)
        cfg = self.text_config
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None and len(layer_types) == len(blocks):
            cfg.layer_types = [layer_types[i] for i in keep]
        cfg.num_hidden_layers = len(keep)
        offloader = offload.offloader_of(self.model)
        if offloader is not None:
            offloader.forget_missing()

    @property
    def device(self) -> torch.device:
        """Where the model computes (its blocks may be offloaded: see ``models.offload``)."""
        return offload.execution_device(self.model)

    def hold(self, indices, write: bool = False):
        """Context: blocks ``indices`` stay on the device, for reading (or, with ``write``, changing)
        their weights outside a forward; nothing to do when the model is in memory."""
        return offload.hold(self.model, [self.blocks[i] for i in indices], write)

    def remove_blocks(self, remove: list[int]) -> list[int]:
        """Remove blocks by current index; returns the kept indices."""
        n = self.num_blocks
        bad = [i for i in remove if not 0 <= i < n]
        if bad:
            raise UserError(f"block index {bad[0]} out of range: the model has blocks 0..{n - 1}")
        keep = [i for i in range(n) if i not in set(remove)]
        self.keep_blocks(keep)
        return keep

    # --- layer-wise execution --------------------------------------------------------------
    def block_output(self, out) -> torch.Tensor:
        return out[0] if isinstance(out, tuple) else out


def get_adapter(model: nn.Module) -> Adapter:
    return Adapter(model)


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_kwargs(adapter: Adapter, seqlen: int) -> list[dict]:
    """Record the keyword arguments the model passes to each block for a 1 x ``seqlen`` input.

    Returns one dict per block (without ``hidden_states``); caching is switched off.
    """
    model = adapter.model
    device = adapter.device
    captured: list[dict | None] = [None] * adapter.num_blocks
    handles = []

    def make_hook(i):
        def hook(module, args, kwargs):
            # Some families (GPT-2) pass masks positionally: bind everything to names.
            bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
            extra = bound.pop("kwargs", {})
            kw = {**{k: v for k, v in bound.items() if k != "hidden_states"}, **extra}
            # No cache, under whichever name this transformers passed it (setting another name as well
            # makes transformers warn that both are set).
            kw.update({name: None for name in CACHE_ARGUMENTS if name in kw}, use_cache=False)
            captured[i] = kw
            if i == adapter.num_blocks - 1:
                raise _Stop

        return hook

    for i, block in enumerate(adapter.blocks):
        handles.append(block.register_forward_pre_hook(make_hook(i), with_kwargs=True, prepend=True))
    try:
        ids = torch.zeros(1, seqlen, dtype=torch.long, device=device)
        try:
            model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in captured):
        raise RuntimeError("could not capture the per-block arguments of every block")
    return captured  # type: ignore[return-value]


@torch.no_grad()
def embed_inputs(adapter: Adapter, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
    """The hidden state entering block 0 (embeddings, plus learned positions for GPT-2; with a VLM's
    ``pixel_values`` in ``inputs``, the image features it merges at the image tokens)."""
    box: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        box.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    # prepend: it stops the forward before an offloaded block 0 would be loaded
    handle = adapter.blocks[0].register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        adapter.model(input_ids=input_ids, use_cache=False, **inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box[0]


class BlockRunner:
    """Runs a model's blocks one at a time on cached hidden states (for a fixed sequence length).

    ``kwargs[i]`` belongs to block ``i`` of the model as it was when the runner was built; after
    blocks are removed, build a new runner (sliding/full attention types move with their blocks).
    """

    def __init__(self, adapter: Adapter, seqlen: int):
        self.adapter = adapter
        self.seqlen = seqlen
        self.kwargs = capture_block_kwargs(adapter, seqlen)

    def run_block(self, i: int, hidden: torch.Tensor, block: nn.Module | None = None) -> torch.Tensor:
        block = self.adapter.blocks[i] if block is None else block
        return self.adapter.block_output(block(hidden, **self.kwargs[i]))

    def run(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None, skip: int | None = None):
        """Run blocks ``start``..``stop-1`` (skipping ``skip``) from ``hidden``."""
        stop = self.adapter.num_blocks if stop is None else stop
        for i in range(start, stop):
            if i != skip:
                hidden = self.run_block(i, hidden)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the last block's output."""
        out = self.adapter.lm_head(self.adapter.final_norm(hidden))
        softcap = getattr(self.adapter.text_config, "final_logit_softcapping", None)
        if softcap:
            out = torch.tanh(out / softcap) * softcap
        return out
