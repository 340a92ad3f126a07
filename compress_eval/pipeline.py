"""The one path for the data: load -> calibrate -> compress (score, remove, fuse or merge) -> recover
-> quantize -> save. Evaluation and recording follow in ``evaluate.evaluate_and_record``.

Each step reads the previous step's output and nothing else; the CLI commands are thin wrappers.
"""

from __future__ import annotations

import datetime as _dt
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress_eval.config import CompressConfig, dump_recipe
from compress_eval.data.calibration import calibration_windows
from compress_eval.errors import UserError
from compress_eval.manifest import BaseModelRef, Manifest
from compress_eval.memory import peak_rss_mb
from compress_eval.methods.recovery import fine_tune
from compress_eval.methods.registry import defaulted_amount, get_method, resolve_config
from compress_eval.models import checkpoint
from compress_eval.models.adapters import get_adapter
from compress_eval.models.loading import load_model, resolve_device
from compress_eval.plan import resolve_offload
from compress_eval.quantize import bnb_config, quantize_model, require_unquantized
from compress_eval.results import store


class Timer:
    """Named wall-clock timings of the pipeline's steps, for the manifest."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


@dataclass
class Compressed:
    """A compressed model in memory, with what the checkpoint directory will hold beside it."""

    model: torch.nn.Module
    tokenizer: object
    manifest: Manifest
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> content (charts)


def placement(cfg: CompressConfig, log=print) -> str:
    """The offload mode of this run (``auto``: the plan's choice from the model's size, the run's predicted
    activations and the free memory), stated in the log; stages that need the whole model at once
    refuse an offloaded one."""
    mode = resolve_offload(cfg.offload, cfg.model, resolve_device(cfg.device), cfg.dtype, cfg.method, cfg.options,
                           cfg.calib_samples, cfg.seqlen, cfg.sparsity, cfg.num_blocks, cfg.trust_remote_code, log)
    stage = ("--recover " + cfg.recovery.recover) if cfg.recovery.recover != "none" else \
        ("--quantize " + cfg.quantize) if cfg.quantize else None
    if mode != "none" and stage:
        raise UserError(f"{stage} needs the whole model on the device at once, and this run offloads it "
                        f"(--offload {mode}): run it on the saved checkpoint with --offload none, where "
                        f"the model fits")
    return mode


def compress(cfg: CompressConfig, data_dir: str | Path | None = None, log=print) -> Compressed:
    """Compress ``cfg.model`` in memory: method, then the recovery and quantization stages."""
    timer = Timer()
    default = defaulted_amount(cfg)
    if default:
        log(f"no amount given: {default} ({cfg.method}'s default)")
    cfg = resolve_config(cfg)
    method = get_method(cfg)  # validates the method and its options before any heavy work
    if cfg.quantize:
        bnb_config(cfg.quantize, cfg.double_quant, cfg.compute_dtype)  # bitsandbytes installed?
    recover = cfg.recovery.recover != "none"
    offload = placement(cfg, log)
    torch.manual_seed(cfg.seed)
    with timer.step("load"):
        model, tokenizer, source = load_model(cfg.model, cfg.device, cfg.dtype, cfg.allow_pickle,
                                              cfg.trust_remote_code, offload, cfg.offload_dir)
    require_unquantized(model, cfg.model)
    adapter = get_adapter(model)
    blocks_before = adapter.num_blocks
    params_before, bytes_before = checkpoint.parameter_count(model), checkpoint.weight_bytes(model)
    calib = None
    if method.needs_calibration or recover:
        adapter.require_context(cfg.seqlen, "--seqlen")
        with timer.step("calibrate"):
            calib = calibration_windows(tokenizer, cfg.calib_data, cfg.calib_samples, cfg.seqlen,
                                        cfg.seed, data_dir)
    log(f"compressing {cfg.model} ({blocks_before} blocks) with {cfg.method}")
    with timer.step("compress"):
        record = method.compress(adapter, calib)
    recovery = None
    if recover:
        with timer.step("recover"):
            recovery = fine_tune(model, calib, cfg.recovery, seed=cfg.seed, log=log)
    record = method.finish(adapter, record)
    params_after = checkpoint.parameter_count(model)  # before quantization: bitsandbytes packs 2 per byte
    quantization = None
    if cfg.quantize:
        log(f"quantizing to {cfg.quantize} with bitsandbytes")
        with timer.step("quantize"):
            model, quantization = quantize_model(model, cfg.quantize, cfg.double_quant, cfg.compute_dtype,
                                                 record.tie_map)
    manifest = Manifest(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        base_model=BaseModelRef(name=cfg.model, kind=source.kind, location=source.location),
        method=cfg.method, config=cfg.model_dump(mode="json"), method_options=method.options.model_dump(mode="json"),
        recipe=dump_recipe(cfg), seed=cfg.seed,
        blocks_before=blocks_before, blocks_after=adapter.num_blocks, removed_blocks=record.removed_blocks,
        tie_map=record.tie_map,
        params_before=params_before, params_after=params_after,
        weight_bytes_before=bytes_before, weight_bytes_after=checkpoint.weight_bytes(model),
        offload=offload, quantization=quantization, recovery=recovery, details=record.details, timings_s=timer.seconds,
        peak_rss_mb=peak_rss_mb(), versions=checkpoint.package_versions(), git_sha=checkpoint.git_sha(),
    )
    return Compressed(model, tokenizer, manifest, record.artifacts)


def save(result: Compressed, out: str | Path) -> Path:
    """Write the checkpoint atomically: weights, tokenizer, manifest, recipe and charts."""
    out = Path(out)
    start = time.perf_counter()
    manifest = result.manifest
    with checkpoint.atomic_output_dir(out) as tmp:
        checkpoint.save_model_files(result.model, result.tokenizer, tmp, manifest.tie_map,
                                    manifest.config.get("max_shard_size", "5GB"))
        for name, content in result.artifacts.items():
            (tmp / name).write_bytes(content)
        store.write_recipe(tmp, manifest.recipe)
        manifest.timings_s["save"] = round(time.perf_counter() - start, 3)
        store.write_manifest(tmp, manifest)
    return out


def compress_to_dir(cfg: CompressConfig, out: str | Path, data_dir: str | Path | None = None, log=print) -> Path:
    checkpoint.ensure_new_output(out)  # fail before the slow part, not after it
    return save(compress(cfg, data_dir, log), out)
