"""Predict a run's peak memory from the model's config alone, before anything is loaded.

A 70B model that runs out of memory after an hour of calibration wastes the hour; ``compress-eval
plan`` says beforehand, per pipeline step, how much device and host memory the run will hold at its
peak, and whether that fits. Parameters are counted exactly on a meta-device model (every shape, no
storage); activations follow what the pipeline allocates (prefix cache, one block's forward, the
logits of one window, the fine-tune's saved tensors, FF features). The constants that are not shapes
were measured on SmolLM2-135M and are checked by ``bench/plan_accuracy.py``.

Sizes are bytes throughout; the table shows GB (10^9 bytes), as ``--device-memory 24GB`` reads.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from compress_eval.config import CompressConfig
from compress_eval.errors import UserError
from compress_eval.sizes import parse_memory

log = logging.getLogger(__name__)

GB = 10**9
MiB = 2**20
EXAMPLE_CONFIGS = Path(__file__).resolve().parent / "model_configs"

# Host memory beside weights and activations, measured (VmHWM, SmolLM2-135M, WikiText-2) by the
# baseline probe of bench/plan_accuracy.py (see bench/results/plan_accuracy.json). Tokenizing a
# corpus peaks above what it keeps, and the C allocator keeps that peak for the process:
IMPORTS = 253 * MiB  # python -m compress_eval: Python, torch, transformers and our CLI imported
TOKENIZER = 131 * MiB  # the tokenizer loaded (transformers' tokenization modules with it)
CALIB_CORPUS = 140 * MiB  # the calibration corpus read and tokenized (WikiText-2), at its peak
EVAL_CORPUS = 161 * MiB  # the evaluation split read and tokenized (WikiText-2 test), at its peak
HOST_BASELINE = IMPORTS + TOKENIZER + CALIB_CORPUS  # a compress run once calibration data is in memory
# Room kept free on each memory: allocator slack, the CUDA context (not measured here: this machine
# has no GPU), the OS. A plan fits when its peak is at most (1 - HEADROOM) of what is available.
HEADROOM = 0.10
# Every row of bench/results/plan_accuracy.md is within this fraction of the measured peak: a forced
# --offload none is refused only when the plan's peak, lowered by it, still exceeds the memory.
PLAN_ERROR = 0.20
NO_MEMORY_CHECK = "COMPRESS_EVAL_NO_MEMORY_CHECK"  # set: a forced --offload none runs whatever the plan says

class OffloadChoice(NamedTuple):
    """``--offload auto``'s answer: the mode and a sentence for the log (unpacks as (mode, reason))."""

    mode: str
    reason: str


def choose_offload(weight_bytes: int, activation_bytes: int, device_free: int, host_free: int,
                   device_type: str) -> OffloadChoice:
    """What ``--offload auto`` does: ``none`` when weights and activations fit the device, else ``cpu``
    when a GPU's weights fit the host (there they wait beside it), else ``disk``.

    ``device_free`` / ``host_free`` are the bytes free for the run (``HEADROOM`` is kept back here);
    ``activation_bytes`` is the run's peak beside its weights on the device. On a CPU device the host
    is the device, so ``cpu`` would gain nothing: it is ``none`` or ``disk``. Pure: no measurement.
    """
    gb = GB
    need = weight_bytes + activation_bytes
    if need <= (1 - HEADROOM) * device_free:
        return OffloadChoice("none", f"model {weight_bytes / gb:.1f} GB + activations {activation_bytes / gb:.1f} GB "
                                     f"fit the {device_free / gb:.1f} GB free on the {device_type} device")
    if device_type == "cuda" and weight_bytes <= (1 - HEADROOM) * host_free:
        return OffloadChoice("cpu", f"model {weight_bytes / gb:.1f} GB + activations {activation_bytes / gb:.1f} GB "
                                    f"do not fit the {device_free / gb:.1f} GB free on the GPU; the weights fit "
                                    f"the {host_free / gb:.1f} GB free on the host")
    where = "" if device_type != "cuda" else f" nor the weights the {host_free / gb:.1f} GB on the host"
    return OffloadChoice("disk", f"model {weight_bytes / gb:.1f} GB + activations {activation_bytes / gb:.1f} GB "
                                 f"do not fit the {device_free / gb:.1f} GB free on the {device_type} device{where}")


# --- the model: its config and its sizes ---------------------------------------------------------
def example_names() -> list[str]:
    """Configs shipped with the package (``llama3-8b``, ``llama3-70b``): planning needs no download."""
    return sorted(p.stem for p in EXAMPLE_CONFIGS.glob("*.json"))


def load_config(model: str, trust_remote_code: bool = False):
    """The transformers config of MODEL: a directory with config.json, a config.json path, a shipped
    example config, or one of our model names (never its weights)."""
    from transformers import AutoConfig

    from compress_eval.models.registry import ALIASES, PACKAGED, packaged_cache_path, packaged_gguf, resolve

    path = Path(model).expanduser()
    if path.is_file() or model in example_names():
        file = path if path.is_file() else EXAMPLE_CONFIGS / f"{model}.json"
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{file} is not a JSON config: give a model's config.json") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise UserError(f"{file} has no model_type: give a transformers config.json")
        return _config_for(data, file)
    if model.endswith(".json"):
        raise UserError(f"config file {model} not found: give the path of a model's config.json")
    try:
        source = resolve(model)  # directories, packaged models, aliases, Hub ids
    except UserError as exc:
        if not str(exc).startswith("unknown model"):
            raise
        names = example_names() + list(ALIASES) + list(PACKAGED)
        close = difflib.get_close_matches(model, list(dict.fromkeys(names)), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown model {model!r}: {hint}give a model directory, a config.json, an alias from "
                        f"`compress-eval models` or a shipped config ({', '.join(example_names())})") from None
    where, kwargs = source.location, {}
    if source.kind == "packaged" and not (Path(source.location) / "config.json").exists():
        gguf = packaged_gguf(model)  # the package's GGUF, or its parts assembled once
        where, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif source.kind == "packaged":
        where = str(packaged_cache_path(model))
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{model!r} needs its own Python code: pass --trust-remote-code if you trust "
                            f"its authors") from None
        raise UserError(f"cannot read the config of {model!r}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise UserError(f"cannot read the config of {model!r} ({where}): {str(exc).splitlines()[0]}; give a "
                        f"local directory or a config.json (or check the network / HF cache)") from None


def _config_for(data: dict, file: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{file}: not a config transformers knows ({str(exc).splitlines()[0]})") from None


def config_dtype_bytes(config) -> int | None:
    """Bytes per weight in the checkpoint files, from the config's dtype (None when it names none)."""
    import torch

    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name.itemsize
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(name).removeprefix("torch."))


@dataclass(frozen=True)
class Architecture:
    """What memory depends on in a model, counted on the meta device (``parameters`` counts a tied
    tensor once, as a checkpoint holds it)."""

    model_type: str
    parameters: int
    buffers: int  # elements of buffers (rotary tables): they stay on the device whatever the offload
    blocks: tuple[int, ...]  # parameters per decoder block
    embedding: int  # the input embedding unit (with the head when tied)
    head: int  # a separate LM head (0 when tied)
    other: int  # everything else outside the blocks (final norm, a vision tower)
    linears: int  # parameters of one block's linears (the largest block)
    largest_linear: int
    ff: int  # parameters of one block's FF sublayer
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eager_attention: bool  # scores materialized (batch x heads x T x T)
    file_bytes: int | None  # bytes per weight in the checkpoint files

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def block(self) -> int:
        return max(self.blocks)

    def largest_unit(self) -> int:
        """Parameters of the largest unit an offloaded run puts on the device: a block or a part."""
        return max(self.block, self.embedding, self.head, self.other)


def architecture(config, trust_remote_code: bool = False) -> Architecture:
    """Sizes of the model a config describes, from an instance on the meta device (seconds, even 70B)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from compress_eval.models.adapters import get_adapter, is_multimodal

    auto = AutoModelForImageTextToText if is_multimodal(getattr(config, "model_type", None)) else AutoModelForCausalLM
    try:
        with init_empty_weights():
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot build a {getattr(config, 'model_type', '?')} model from its config: "
                        f"{str(exc).splitlines()[0]}") from None
    model.tie_weights()  # init_empty_weights leaves a tied head untied: it would count twice
    adapter = get_adapter(model)  # unsupported architectures fail here, with the supported list

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    blocks = adapter.blocks
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    head_params = 0 if head is None or tied else count(head)
    embed_params = count(embed)
    outside = total - sum(p.numel() for p in model.parameters() if id(p) in block_ids)
    block0 = blocks[max(range(len(blocks)), key=lambda i: count(blocks[i]))]
    linears = [adapter.weight_out_in(adapter.linear(block0, r)).shape for r in adapter.linear_roles()]
    fc = "up" if adapter.is_gated_mlp else "fc1"
    text = adapter.text_config
    heads = text.num_attention_heads
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return Architecture(
        model_type=text.model_type,
        parameters=total,
        buffers=sum(b.numel() for b in model.buffers()),
        blocks=tuple(count(b) for b in blocks),
        embedding=embed_params,
        head=head_params,
        other=max(0, outside - embed_params - head_params),
        linears=sum(o * i for o, i in linears),
        largest_linear=max(o * i for o, i in linears),
        ff=count(adapter.mlp(block0)),
        hidden=embed.weight.shape[1],
        intermediate=adapter.weight_out_in(adapter.linear(block0, fc)).shape[0],
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or embed.weight.shape[1] // heads,
        vocab=embed.weight.shape[0],
        eager_attention=attn == "eager",
        file_bytes=config_dtype_bytes(config),
    )


# --- what one run does -------------------------------------------------------------------------
class RunShape(BaseModel):
    """The settings memory depends on, resolved as the pipeline resolves them (profiles included)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    kind: Literal["none", "depth", "fusion", "merge"]
    device_type: Literal["cpu", "cuda"]
    dtype_bytes: int
    offload: Literal["none", "cpu", "disk"]
    calib_samples: int
    seqlen: int
    remove_blocks: int = Field(description="blocks the run removes (save and eval hold the smaller model)")
    score_samples: int = Field(description="windows in the prefix cache")
    batch_size: int
    cache_on_host: bool = False
    logits_scoring: bool = False  # scores are token NLLs (SLEB, window drop, sublayer)
    candidates: int = Field(0, description="suffix states the scoring advances together (one per candidate)")
    training: str | None = None  # fusion: fuse, lora, lowrank
    group_size: int = 0
    coef_rank: int = 0
    lora_rank: int = 0
    extra_rank: int = 0
    kd_logits: bool = False
    merge_window: int = 0
    feature_tokens: int = 0
    cka_tokens: int = 0
    permute: bool = True
    eval_seqlen: int | None = 2048
    max_shard_bytes: int = 5 * GB


class StepMemory(BaseModel):
    """Predicted peak of one step: device and host bytes (equal on a CPU run, where they are one memory)."""

    step: str
    device: int
    host: int
    note: str = ""


class Plan(BaseModel):
    model: str
    method: str
    device_type: str
    dtype: str
    offload: str
    offload_reason: str = ""
    parameters: int
    weight_bytes: int
    calibration: str
    steps: list[StepMemory]
    peak_device: int
    peak_host: int
    device_available: int
    host_available: int
    device_source: str
    host_source: str
    fits: bool
    verdict: str
    notes: list[str] = Field(default_factory=list)

    @property
    def unified(self) -> bool:
        return self.device_type == "cpu"


def _block_work(a: Architecture, batch: int, tokens: int, b: int) -> int:
    """One block's forward without gradients: the residual stream and norms (~4 hidden-sized tensors),
    the MLP's intermediates (gate, up, their product), q/k/v and the attention output (sdpa/flash:
    no tokens x tokens matrix; eager attention materializes the scores, in fp32 for the softmax)."""
    per_token = 4 * a.hidden + 3 * a.intermediate + (2 * a.heads + 2 * a.kv_heads) * a.head_dim
    scores = batch * a.heads * tokens * tokens * (2 * b + 4) if a.eager_attention else 0
    return batch * tokens * per_token * b + scores


def _logits(a: Architecture, tokens: int, b: int) -> int:
    """The NLL of one window: its logits (run dtype), their fp32 copy (when not fp32) and the
    log-softmax cross_entropy makes (fp32)."""
    return tokens * a.vocab * (b + 4 + (4 if b != 4 else 0))


def _saved_for_backward(a: Architecture, batch: int, tokens: int, b: int) -> int:
    """What one trained block keeps for its backward pass: the inputs of its linears, the MLP's
    intermediates, q/k/v and the attention output, and the norms' fp32 inputs."""
    per_token = b * (6 * a.hidden + 4 * a.intermediate + (2 * a.heads + 2 * a.kv_heads) * a.head_dim) + 16 * a.hidden
    return batch * tokens * per_token


@dataclass
class _Step:
    """One step's pieces before they are placed: weights on the device and the host, activations."""

    name: str
    device_weights: int = 0
    host_weights: int = 0
    device_act: int = 0
    host_act: int = 0
    note: str = ""
    baseline: int = HOST_BASELINE  # the process's own host memory at this step


def _steps(a: Architecture, run: RunShape) -> list[_Step]:
    b = run.dtype_bytes
    w = a.parameters * b
    w_after = w - run.remove_blocks * a.block * b
    if run.kind == "merge":
        w_after = w - (run.merge_window - 1) * a.ff * b
    buffers = a.buffers * 4
    unit = a.largest_unit() * b
    block = a.block * b
    cuda = run.device_type == "cuda"
    offloaded = run.offload != "none"
    T, N, B = run.seqlen, run.score_samples, min(run.batch_size, run.score_samples)
    state = T * a.hidden * b  # one window's hidden state

    def on_device(units: int) -> int:
        """Weights on the device while ``units`` bytes of units run."""
        return w if not offloaded else buffers + units

    def on_host(units: int, store: int = w) -> int:
        """Weights on the host: the store (cpu), the units in flight (disk), nothing (none)."""
        return {"none": 0, "cpu": store, "disk": units}[run.offload]

    file_bytes = a.parameters * (a.file_bytes or b)
    steps = []
    # load: from_pretrained reads the files on the host, then the model moves to the device; a dtype
    # conversion holds the file's pages beside the converted copy while it runs.
    convert = a.file_bytes is not None and a.file_bytes != b
    if run.offload == "none":
        host = (w + (file_bytes if convert else 0)) if cuda else (file_bytes if convert else 0)
        steps.append(_Step("load", device_weights=w, host_weights=host, baseline=IMPORTS + TOKENIZER,
                           note="weights" + (f", converted from {a.file_bytes}-byte files" if convert else "")))
    elif run.offload == "cpu":
        steps.append(_Step("load", device_weights=buffers, host_weights=w, baseline=IMPORTS + TOKENIZER,
                           note="weights into host memory"))
    else:
        steps.append(_Step("load", device_weights=buffers, baseline=IMPORTS + TOKENIZER,
                           note="weights stay in their files"))
    if run.kind == "none":
        steps.append(_Step("compress", device_weights=on_device(0), host_weights=on_host(0), note="nothing to score"))
    else:
        steps.append(_Step("calibrate", device_weights=on_device(0), host_weights=on_host(0),
                           note=f"{run.calib_samples} x {T} tokens"))
    if run.kind in ("depth", "fusion"):
        cache = (a.num_blocks + 1) * N * state
        work = _block_work(a, B, T, b)
        logits = _logits(a, T, b) if run.logits_scoring else 0
        if run.kind == "fusion":
            work += 3 * B * state * 4 // b  # fp32 cosines of H and H without the block
        # The activations add up (a block's, then a window's logits: the allocator keeps the first
        # for the second); an offloaded run holds one unit at a time beside them: the embeddings
        # (before any block ran), a block, or the head (for the logits).
        act = work + logits + run.candidates * B * state
        units = max(block, (a.head or a.embedding) * b if logits else 0, a.embedding * b - work - logits)
        steps.append(_Step("score", device_weights=on_device(units), host_weights=on_host(units),
                           device_act=act + (0 if run.cache_on_host else cache),
                           host_act=cache if run.cache_on_host else 0,
                           note=f"prefix cache {(a.num_blocks + 1)} x {N} x {T} x {a.hidden}"
                                + (" on the host" if run.cache_on_host else "") + f", batch {B}"
                                + (", logits of a window" if run.logits_scoring else "")))
    if run.kind == "fusion" and run.training:
        steps.append(_fine_tune_step(a, run, on_device, on_host))
    if run.kind == "merge":
        steps.extend(_merge_steps(a, run, on_device, on_host))
    # save: CPU tensors are written from their own memory; a GPU's are copied to the host a shard at
    # a time (transformers' save_pretrained); an offloaded model streams into each shard a unit at a
    # time (the shard's header first), so only that unit is held, whatever --max-shard-size is.
    shard = min(w_after, run.max_shard_bytes)
    if offloaded:
        steps.append(_Step("save", device_weights=buffers + unit, host_weights=on_host(unit, w_after),
                           host_act=unit if cuda else 0, note="shards streamed unit by unit"))
    else:
        steps.append(_Step("save", device_weights=w_after, host_act=shard if cuda else 0,
                           note="safetensors" + (", each shard copied to the host" if cuda else "")))
    if run.eval_seqlen:
        # perplexity() keeps the previous window's logits while the next window runs: two of them.
        Te = run.eval_seqlen
        act = _block_work(a, 1, Te, b) + _logits(a, Te, b) + Te * a.vocab * b
        units = max(block, (a.head or a.embedding) * b, a.embedding * b - act)
        load_host = (w_after if cuda else 0) if run.offload == "none" else 0
        steps.append(_Step("ppl eval", device_weights=w_after if not offloaded else buffers + units,
                           host_weights=max(load_host, on_host(units, w_after)), device_act=act,
                           baseline=IMPORTS + TOKENIZER + EVAL_CORPUS, note=f"reloaded, batch 1 x {Te} tokens"))
    return steps


def _fine_tune_step(a: Architecture, run: RunShape, on_device, on_host) -> _Step:
    """FuseGPT's group fine-tune (and its ablations): the group's inputs and targets on all windows,
    each member block's trainable factors with their gradients and Adam moments (fp32), one fused
    linear's effective weight at a time (made again in the backward pass, not kept), and the activations
    saved for the backward at ``batch_size`` windows."""
    b = run.dtype_bytes
    T = run.seqlen
    G = min(run.group_size, a.num_blocks)
    members = G - 1
    Bf = min(run.batch_size, run.calib_samples)
    io = 2 * run.calib_samples * T * a.hidden * b  # inputs and targets of the group
    hidden, inter = a.hidden, a.intermediate
    # Trainable factors of one block's linears (q/k/v/o and the FF), ranks clamped to each linear.
    shapes = [(hidden, hidden)] * 4 + [(inter, hidden)] * 3  # an upper bound of the real shapes
    rank = (run.lora_rank + (run.coef_rank if run.training in ("fuse", "lowrank") else 0)
            + (run.extra_rank if run.training == "fuse" else 0))
    trainable = sum(min(rank, o, i) * (o + i) for o, i in shapes) * members
    optimizer = trainable * 4 * 6  # fp32 parameter, gradient, two Adam moments, two foreach temporaries
    saved = _saved_for_backward(a, Bf, T, b) * members
    # One piece of one linear's backward (W' in fp32 made again, its gradient, the product with the
    # injected weight), one block's forward.
    from compress_eval.methods.fusion import ROW_CHUNK_BYTES

    transient = 3 * min(a.largest_linear * 4, ROW_CHUNK_BYTES) + _block_work(a, Bf, T, b)
    if run.kd_logits:
        transient += _logits(a, T, b) * 2 * Bf
    mse = 2 * Bf * T * a.hidden * 4
    cache = (a.num_blocks + 1) * run.score_samples * T * a.hidden * b
    act = max((0 if run.cache_on_host else cache) + io + _block_work(a, Bf, T, b),  # inputs/targets made
              io + optimizer + saved + transient + mse)
    units = G * a.block * b + (max(a.block, a.head, a.embedding) * b if run.kd_logits else 0)
    return _Step("fine-tune", device_weights=on_device(units), host_weights=on_host(units), device_act=act,
                 note=f"group of {G} blocks, batch {Bf}, {run.calib_samples} windows")


def _merge_steps(a: Architecture, run: RunShape, on_device, on_host) -> list[_Step]:
    """FF merging: neuron features of every layer (gathered in bf16, standardized into fp16, on the
    host), FF outputs for the CKA map, the scorer's prefix cache (batch 1, on the host); per candidate
    the d_ff x d_ff correlation (made on the device; on the host the assignment works on float64
    copies of it) and the merged FF (the window's aligned FF tensors, stacked in fp32 a tensor at a
    time, on the device)."""
    b = run.dtype_bytes
    T, L, I = run.seqlen, a.num_blocks, a.intermediate
    windows = min(run.calib_samples, max(1, math.ceil(run.feature_tokens / T)))
    gathered = windows * T
    kept = min(gathered, run.feature_tokens)
    out_tokens = min(gathered, math.ceil(run.cka_tokens / T) * T)
    # The raw features are freed layer by layer as they are standardized, but in pieces of one window
    # (T x d_ff) that the C allocator keeps in the process: measured, they stay counted.
    raw = L * gathered * I * 2
    standardize = gathered * I * 2 + kept * I * 12  # one layer: the concatenation, fp32 x, x - mean, / std
    features = L * kept * I * 2 + L * out_tokens * a.hidden * 4
    forward = _block_work(a, 1, T, b) + T * a.vocab * b  # a full forward: logits of one window
    unit = max(a.block, a.embedding, a.head) * b
    collect = _Step("FF features", device_weights=on_device(unit), host_weights=on_host(unit),
                    device_act=forward, host_act=raw + features + standardize,
                    note=f"{L} layers x {kept} tokens x {I} neurons")
    cache = (L + 1) * run.score_samples * T * a.hidden * b
    corr = I * I * 4
    align = corr * 5 if run.permute else 0  # the host copy; the assignment's float64 copies
    size = run.merge_window
    merged = size * a.ff * b + size * I * a.hidden * 8 + a.ff * (4 + 2 * b)  # states, fp32 stack, mean, copy
    window = size * a.block * b
    score = _Step("score windows", device_weights=on_device(max(window, unit)), host_weights=on_host(window),
                  device_act=max(2 * corr if run.permute else 0, merged, _block_work(a, 1, T, b) + _logits(a, T, b)),
                  host_act=raw + features + cache + align,
                  note=f"prefix cache {L + 1} x {run.score_samples} x {T} on the host, window of {size}")
    return [collect, score]


def place(steps: list[_Step], run: RunShape) -> list[StepMemory]:
    """Device and host bytes of each step. On a CPU run the device is the host: one number, with the
    weights counted once (a CPU offload's store is the units it lends)."""
    out = []
    for s in steps:
        if run.device_type == "cpu":
            if run.offload == "none":
                weights = s.device_weights + s.host_weights  # the host part: a load's file pages
            else:  # the units the device runs are the host's tensors themselves
                weights = max(s.device_weights, s.host_weights)
            total = s.baseline + weights + s.device_act + s.host_act
            out.append(StepMemory(step=s.name, device=total, host=total, note=s.note))
        else:
            out.append(StepMemory(step=s.name, device=s.device_weights + s.device_act,
                                  host=s.baseline + s.host_weights + s.host_act, note=s.note))
    return out


# --- available memory ----------------------------------------------------------------------------
def host_available() -> int:
    """MemAvailable of /proc/meminfo: what the run can have without swapping."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise UserError("cannot read MemAvailable from /proc/meminfo: give --host-memory (e.g. 64GB)")


def device_available(device: str) -> int:
    """Free memory of a CUDA device (``torch.cuda.mem_get_info``)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device to measure: give --device-memory "
                        f"(e.g. 24GB) to plan for one")
    return torch.cuda.mem_get_info(torch.device(device))[0]


# --- the plan --------------------------------------------------------------------------------------
def run_shape(a: Architecture, cfg: CompressConfig, device_type: str, dtype_bytes: int, offload: str,
              eval_seqlen: int | None = 2048) -> RunShape:
    """The settings of a run as the pipeline resolves them (the method's options validated and its profile
    applied); a recipe of several stages is planned by its first method's."""
    from compress_eval.config import MethodStage
    from compress_eval.methods.registry import get_method, resolve_config

    first = next((s for s in cfg.stage_list() if isinstance(s, MethodStage)), None) if cfg.stages else None
    one = resolve_config(cfg.stage_config(first) if first else cfg)
    compressor = get_method(one)  # unknown methods and bad options fail here, as in compress
    return RunShape(method=one.method, device_type=device_type, dtype_bytes=dtype_bytes, offload=offload,
                    calib_samples=one.calib_samples, seqlen=one.seqlen, eval_seqlen=eval_seqlen,
                    max_shard_bytes=parse_memory(cfg.max_shard_size),
                    batch_size=getattr(compressor.options, "batch_size", None) or 8,
                    **compressor.memory_shape(a.num_blocks))


def make_plan(cfg: CompressConfig, device_memory: str | None = None, host_memory: str | None = None,
              eval_seqlen: int | None = 2048) -> Plan:
    """The plan of ``compress`` with this config (on ``cfg.device``, default the CPU), and whether it fits the
    memory given (or, when not given, what this machine has free). Cheap checks of the input come first, so
    a typo fails before the model is built."""
    import torch

    from compress_eval.config import RecoverStage
    from compress_eval.methods.registry import method_class
    from compress_eval.models.loading import parse_dtype

    device, offload = cfg.device or "cpu", cfg.offload
    try:
        device_type = torch.device(device).type
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if device_type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    for stage in cfg.stage_list():
        if getattr(stage, "method", None):
            method_class(stage.method)
    torch_dtype = parse_dtype(cfg.dtype, device)
    b = torch_dtype.itemsize
    host_total = parse_memory(host_memory) if host_memory else None
    device_total = parse_memory(device_memory) if device_memory else None
    if device_type == "cpu" and None not in (device_total, host_total) and device_total != host_total:
        raise UserError("on a CPU run the device is the host: give --host-memory or --device-memory, not both")
    if device_type == "cuda" and device_total is None:
        device_available(device)  # no GPU here: ask for --device-memory before the slow part
    a = architecture(load_config(cfg.model, cfg.trust_remote_code), cfg.trust_remote_code)

    def shape(mode: str) -> RunShape:
        return run_shape(a, cfg, device_type, b, mode, eval_seqlen)

    if device_type == "cpu":
        device_avail = host_avail = host_total or device_total or host_available()
        device_source = host_source = "given" if (host_total or device_total) else "MemAvailable"
    else:
        device_avail = device_total if device_total is not None else device_available(device)
        host_avail = host_total if host_total is not None else host_available()
        device_source = "given" if device_total is not None else "free now"
        host_source = "given" if host_total is not None else "MemAvailable"
    reason = ""
    if offload == "auto":
        whole = shape("none")
        raw = _steps(a, whole)
        unified = device_type == "cpu"
        activations = max(s.device_act + (s.host_act if unified else 0) for s in raw)
        host_side = max(s.baseline + s.host_act for s in raw)
        mode, reason = choose_offload(a.parameters * b, activations, device_avail - (HOST_BASELINE if unified else 0),
                                      max(0, host_avail - host_side), device_type)
    else:
        mode = offload
    run = shape(mode)
    steps = place(_steps(a, run), run)
    notes = []
    if device_type == "cpu" and mode == "cpu":
        notes.append("--offload cpu on a CPU device keeps every weight in the same memory: it saves nothing")
    if any(isinstance(s, RecoverStage) for s in cfg.stage_list()):
        notes.append("the --recover stage after the method is not predicted")
    if run.eval_seqlen:
        notes.append("ppl eval: the saved checkpoint evaluated as `compress-eval ppl` does; with --then-eval in the "
                     "same process, memory the compression freed but the allocator kept comes on top")
    peak_device = max(s.device for s in steps)
    peak_host = max(s.host for s in steps)
    fits = peak_device <= (1 - HEADROOM) * device_avail and peak_host <= (1 - HEADROOM) * host_avail
    return Plan(model=cfg.model, method=cfg.method, device_type=device_type, dtype=str(torch_dtype).removeprefix("torch."),
                offload=mode, offload_reason=reason, parameters=a.parameters, weight_bytes=a.parameters * b,
                calibration=f"{run.calib_samples} x {run.seqlen} tokens" if run.kind != "none" else "none",
                steps=steps, peak_device=peak_device, peak_host=peak_host, device_available=device_avail,
                host_available=host_avail, device_source=device_source, host_source=host_source, fits=fits,
                verdict=_verdict(fits, steps, device_avail, host_avail, run, a), notes=notes)


def _verdict(fits: bool, steps: list[StepMemory], device_avail: int, host_avail: int, run: RunShape,
             a: Architecture) -> str:
    """``fits: ...`` or ``does not fit: ...; try ...`` with what would shrink the step that overflows."""
    peak_device = max(s.device for s in steps)
    peak_host = max(s.host for s in steps)
    if run.device_type == "cpu":
        numbers = f"memory {peak_host / GB:.1f} / {host_avail / GB:.1f} GB"
    else:
        numbers = (f"device {peak_device / GB:.1f} / {device_avail / GB:.1f} GB, "
                   f"host {peak_host / GB:.1f} / {host_avail / GB:.1f} GB")
    if fits:
        return f"fits: {numbers}"
    device_over = peak_device > (1 - HEADROOM) * device_avail
    worst = max(steps, key=(lambda s: s.device) if device_over else (lambda s: s.host))
    weights = a.parameters * run.dtype_bytes
    hints = []
    if run.offload == "none" and (run.device_type == "cpu" or device_over):
        hints.append("--offload disk" if run.device_type == "cpu" or weights > (1 - HEADROOM) * host_avail
                     else "--offload cpu")
    elif run.offload == "cpu" and not device_over:
        hints.append("--offload disk")
    if worst.step == "score" and not run.cache_on_host and run.device_type == "cuda":
        hints.append("--set cache_store=cpu")
    if worst.step == "fine-tune":
        hints.append("a smaller --batch-size or --group-size")
    if worst.step in ("score", "fine-tune", "FF features", "score windows"):
        hints.append("fewer --calib-samples or a shorter --seqlen")
    if worst.step == "ppl eval":
        hints.append("a shorter --eval-seqlen")
    if run.dtype_bytes == 4:
        hints.append("--dtype bfloat16")
    return f"does not fit: {numbers} (peak at {worst.step}); try {' or '.join(hints[:3])}"


def resolve_offload(cfg: CompressConfig) -> OffloadChoice:
    """The offload mode a run uses and why: ``cfg.offload`` itself, or for ``auto`` the plan's choice for this
    run on ``cfg.device`` (from the config alone: the weights and the run's predicted activations against the
    free memory). A model whose config cannot be read here is left to the loader to report. The caller says
    it (:func:`say_offload`) once its own checks passed."""
    mode = cfg.offload
    if mode not in ("auto", "none") or (mode == "none" and os.environ.get(NO_MEMORY_CHECK)):
        return OffloadChoice(mode, "as asked")
    try:
        plan = make_plan(cfg, eval_seqlen=None)
    except (UserError, OSError, ValueError) as exc:
        return OffloadChoice("none", f"the model's size is unknown here: {str(exc).splitlines()[0]}")
    if mode == "none":
        refuse_beyond_memory(plan)
        return OffloadChoice(mode, "as asked")
    return OffloadChoice(plan.offload, plan.offload_reason)


def refuse_beyond_memory(plan: Plan) -> None:
    """Refuse, before loading, a run kept in memory (``--offload none``) that the plan says cannot fit even
    if it overestimates by its whole measured error: it would end in an out-of-memory kill, later."""
    sides = [("host", plan.peak_host, plan.host_available, lambda s: s.host)]
    if plan.device_type == "cuda":
        sides.append(("GPU", plan.peak_device, plan.device_available, lambda s: s.device))
    for side, peak, available, of in sides:
        if peak * (1 - PLAN_ERROR) > available:
            step = max(plan.steps, key=of).step
            raise UserError(f"--offload none: the plan predicts {peak / GB:.1f} GB of {side} memory at its {step} "
                            f"step and {available / GB:.1f} GB are available, too little even if the plan "
                            f"overestimates by its measured {PLAN_ERROR:.0%} (bench/results/plan_accuracy.md): use "
                            f"--offload auto to offload what does not fit, or set {NO_MEMORY_CHECK}=1 to run anyway")


def say_offload(mode: str, reason: str) -> None:
    """An offloaded run says so (it is slower, and uses the disk or host memory); the ordinary case, the
    model in memory, goes to the log file only."""
    log.log(logging.INFO if mode != "none" else logging.DEBUG, "offload: %s (%s)", mode, reason)
