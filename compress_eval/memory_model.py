"""The memory model: each step of a run (load, calibrate, score, fine-tune, save, ppl eval) as the device and
host bytes it holds at its peak, from the architecture and the run's shape.

Activations follow what the pipeline allocates (prefix cache, one block's forward, the logits of one
window, the fine-tune's saved tensors, FF features). The constants that are not shapes were measured on
SmolLM2-135M and are checked by ``bench/plan_accuracy.py``. Sizes are bytes throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from compress_eval.architecture import Architecture
from compress_eval.errors import UserError

GB = 10**9
MiB = 2**20

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
