"""Predict a run's peak memory from the model's config alone, before anything is loaded.

A 70B model that runs out of memory after an hour of calibration wastes the hour; ``compress-eval
plan`` says beforehand, per pipeline step, how much device and host memory the run will hold at its
peak, and whether that fits: the run's shape (its method's :meth:`~compress_eval.methods.base.Compressor.memory_shape`)
on the model's architecture (``architecture``), through the memory model (``memory_model``), placed by
the offload policy (``offload_policy``).

Sizes are bytes throughout; the table shows GB (10^9 bytes), as ``--device-memory 24GB`` reads.
"""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from compress_eval.architecture import Architecture, architecture, load_config
from compress_eval.config import CompressConfig
from compress_eval.errors import UserError
from compress_eval.memory_model import (GB, HEADROOM, HOST_BASELINE, RunShape, StepMemory, _steps, device_available,
                                        host_available, place)
from compress_eval.offload_policy import NO_MEMORY_CHECK, PLAN_ERROR, OffloadChoice, choose_offload
from compress_eval.sizes import parse_memory


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


def run_shape(a: Architecture, cfg: CompressConfig, device_type: str, dtype_bytes: int, offload: str,
              eval_seqlen: int | None = 2048) -> RunShape:
    """The settings of a resolved run (the method's options validated, its profile applied); a recipe of
    several stages is planned by its first method's."""
    from compress_eval.config import MethodStage
    from compress_eval.methods.registry import get_method

    first = next((s for s in cfg.stage_list() if isinstance(s, MethodStage)), None) if cfg.stages else None
    one = cfg.stage_config(first) if first else cfg
    compressor = get_method(one)  # unknown methods and bad options fail here, as in compress
    return RunShape(method=one.method, device_type=device_type, dtype_bytes=dtype_bytes, offload=offload,
                    calib_samples=one.calib_samples, seqlen=one.seqlen, eval_seqlen=eval_seqlen,
                    max_shard_bytes=parse_memory(cfg.max_shard_size),
                    batch_size=getattr(compressor.options, "batch_size", None) or 8,
                    **compressor.memory_shape(a.num_blocks))


def make_plan(cfg: CompressConfig, device_memory: str | None = None, host_memory: str | None = None,
              eval_seqlen: int | None = 2048) -> Plan:
    """The plan of ``compress`` with this config (on ``cfg.device``, default the CPU), and whether it fits the
    memory given (or, when not given, what this machine has free)."""
    from compress_eval.methods.registry import resolve_config

    return plan_resolved(resolve_config(cfg), device_memory, host_memory, eval_seqlen)


def plan_resolved(cfg: CompressConfig, device_memory: str | None = None, host_memory: str | None = None,
                  eval_seqlen: int | None = 2048) -> Plan:
    """:func:`make_plan` of a config already resolved (the pipeline's). Cheap checks of the input come
    first, so a typo fails before the model is built."""
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
    return Plan(model=cfg.model, method=cfg.method, device_type=device_type,
                dtype=str(torch_dtype).removeprefix("torch."),
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
    """The offload mode a (resolved) run uses and why: ``cfg.offload`` itself, or for ``auto`` the plan's choice
    for this run on ``cfg.device`` (from the config alone: the weights and the run's predicted activations against the
    free memory). A model whose config cannot be read here is left to the loader to report. The caller says
    it (:func:`say_offload`) once its own checks passed."""
    mode = cfg.offload
    if mode not in ("auto", "none") or (mode == "none" and os.environ.get(NO_MEMORY_CHECK)):
        return OffloadChoice(mode, "as asked")
    try:
        plan = plan_resolved(cfg, eval_seqlen=None)
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
