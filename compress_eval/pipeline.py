"""The one path for the data: load -> calibrate -> compress (score, remove, fuse or merge) -> recover
-> quantize -> save; a multi-stage recipe runs its methods and fine-tunes in order on the same path. Evaluation and recording follow in ``evaluate.evaluate_and_record``.

Each step reads the previous step's output and nothing else; the CLI commands are thin wrappers.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from compress_eval import distributed
from compress_eval.config import CompressConfig, MethodStage, QuantizeStage, RecoverStage, dump_recipe
from compress_eval.data.calibration import calibration_windows, training_windows
from compress_eval.data.image_text import IMAGE_TEXT, image_text_windows, images_in_embeddings
from compress_eval.errors import UserError
from compress_eval.manifest import BaseModelRef, Manifest, StageRecord
from compress_eval.memory import peak_rss_mb
from compress_eval.methods.recovery import fine_tune
from compress_eval.methods.base import CompressionRecord, Compressor
from compress_eval.methods.registry import defaulted_amount, resolve_config, stage_methods
from compress_eval.models import checkpoint
from compress_eval.models.adapters import get_adapter
from compress_eval.models.loading import load_model, load_processor, resolve_device, shared_modules
from compress_eval.models.sublayers import skipped_paths
from compress_eval.paths import data_dir as resolve_data_dir
from compress_eval.plan import resolve_offload, say_offload
from compress_eval.quantize import bnb_config, quantize_model, require_unquantized
from compress_eval.results import store

log = logging.getLogger(__name__)


class Timer:
    """Named wall-clock timings of the pipeline's steps, for the manifest (a step run in several stages
    adds up)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0) + time.perf_counter() - start, 3)


@dataclass
class Compressed:
    """A compressed model in memory, with what the checkpoint directory will hold beside it."""

    model: torch.nn.Module
    tokenizer: object
    manifest: Manifest
    artifacts: dict[str, bytes] = field(default_factory=dict)  # file name -> content (charts)
    processor: object | None = None  # a VLM's, saved so the checkpoint takes images


def placement(cfg: CompressConfig) -> tuple[str, str]:
    """The offload mode of this run and why (``auto``: the plan's choice from the model's size, the
    first method's predicted activations and the free memory); stages that need the whole model at once
    refuse an offloaded one."""
    mode, reason = resolve_offload(cfg.model_copy(update={"device": resolve_device(cfg.device)}))
    whole = next((s for s in cfg.stage_list() if isinstance(s, (RecoverStage, QuantizeStage))), None)
    if mode != "none" and whole is not None:
        stage = f"--recover {whole.recover}" if isinstance(whole, RecoverStage) else f"--quantize {whole.quantize}"
        raise UserError(f"{stage} needs the whole model on the device at once, and this run offloads it "
                        f"(--offload {mode}): run it on the saved checkpoint with --offload none, where "
                        f"the model fits")
    return mode, reason


def require_whole_sublayers(methods: list[Compressor | None], model) -> None:
    """Refuse, before any method runs, a method that reads blocks' linears (fusion, merging) where a
    block lacks a sublayer: in the loaded checkpoint, or after an earlier sublayer stage."""
    why = "the model it is given lacks" if skipped_paths(model) else None
    for method in methods:
        if method is None:
            continue
        if why and not method.runs_partial_blocks:
            raise UserError(f"method {method.name!r} reads every block's attention and MLP, and {why} some: "
                            f"run it before the sublayer pruning, or on a checkpoint without removed sublayers")
        if method.removes_sublayers:
            why = why or f"the {method.name!r} stage before it removes"


def distillation_teacher(model: torch.nn.Module, source, cfg: CompressConfig, offload: str) -> torch.nn.Module:
    """The model whose logits kd and ce+kd recovery learn: the uncompressed one. A compressed checkpoint's is its
    base model (followed through checkpoints made from checkpoints), loaded beside it; any other
    model's is a frozen copy of itself as loaded, kept while the stages change the original."""
    name, kind, location = cfg.model, source.kind, source.location
    chain = []
    while kind == "local" and (manifest := store.read_manifest(location)) is not None:
        chain.append(name)
        base = manifest.base_model
        name, kind, location = base.name, base.kind, base.location
    if not chain:
        return copy.deepcopy(model)
    given = location if kind == "local" else name
    log.info("kd recovery distils %s, the uncompressed model of %s", given, cfg.model)
    try:
        teacher, _, _ = load_model(given, cfg.device, cfg.dtype, cfg.allow_pickle, cfg.trust_remote_code,
                                   offload, cfg.offload_dir)
    except UserError as exc:
        raise UserError(f"--recover-loss kd / ce+kd learns the uncompressed model of {cfg.model}, {given!r}, which "
                        f"cannot be loaded ({exc}); use --recover-loss ce, or restore that model") from None
    return teacher.requires_grad_(False)


def recovery_windows(stage: RecoverStage, calib: torch.Tensor, tokenizer, cfg: CompressConfig,
                     data_dir) -> torch.Tensor:
    """What a recovery stage trains on: the calibration windows, or as many consecutive sequences of the
    calibration corpus' train split as its steps take (each once)."""
    if stage.recover_data == "calibration":
        return calib
    return training_windows(tokenizer, cfg.calib_data, stage.recover_steps * stage.recover_batch_size,
                            stage.recover_seqlen or cfg.seqlen, data_dir)


def compress(cfg: CompressConfig, data_dir: str | Path | None = None) -> Compressed:
    """Compress ``cfg.model`` in memory: its stages in order (methods, recovery fine-tunes), each
    method's finishing step, then quantization; each stage recorded in the manifest.

    What is compressed is said at DEBUG (the log file); INFO is for notices (a default amount, an
    offloaded model, a recipe's stages), so input refused once the model is loaded (a block out of
    range) is still answered by its one error line alone."""
    timer = Timer()
    default = defaulted_amount(cfg)
    cfg = resolve_config(cfg)
    stages = cfg.stage_list()
    methods = stage_methods(cfg)  # validates the methods and their options before any heavy work
    quantize = stages[-1] if isinstance(stages[-1], QuantizeStage) else None
    if quantize:
        bnb_config(quantize.quantize, quantize.double_quant, quantize.compute_dtype)  # bitsandbytes installed?
    offload, reason = placement(cfg)
    torch.manual_seed(cfg.seed)
    with timer.step("load"):
        model, tokenizer, source = load_model(cfg.model, cfg.device, cfg.dtype, cfg.allow_pickle,
                                              cfg.trust_remote_code, offload, cfg.offload_dir)
        processor = load_processor(model, cfg.model, cfg.trust_remote_code)
    say_offload(offload, reason)
    require_unquantized(model, cfg.model)
    require_whole_sublayers(methods, model)
    adapter = get_adapter(model)
    blocks_before = adapter.num_blocks
    params_before, bytes_before = checkpoint.parameter_count(model), checkpoint.weight_bytes(model)
    calib = images = None
    if any(m is not None and m.needs_calibration for m in methods) or any(isinstance(s, RecoverStage) for s in stages):
        adapter.require_context(cfg.seqlen, "--seqlen")
        with timer.step("calibrate"):
            if cfg.calib_data in IMAGE_TEXT:
                images = image_text_windows(model, processor, cfg.calib_data, cfg.calib_samples, cfg.seqlen,
                                            cfg.seed)
                calib = images.ids
            else:
                calib = calibration_windows(tokenizer, cfg.calib_data, cfg.calib_samples, cfg.seqlen,
                                            cfg.seed, data_dir)
            # Each recovery stage's text, read now: a missing train split fails before any method runs.
            training = {n: recovery_windows(s, calib, tokenizer, cfg, data_dir) for n, s in enumerate(stages, 1)
                        if isinstance(s, RecoverStage)}
    log.debug("compressing %s (%d blocks) with %s", cfg.model, blocks_before, cfg.method)
    if default:
        log.info("no amount given: %s (%s's default)", default, cfg.method)
    teacher = distillation_teacher(model, source, cfg, offload) if any(
        isinstance(s, RecoverStage) and s.distils for s in stages) else None
    original = list(range(blocks_before))  # the original index of each block still there
    done: list[StageRecord] = []
    records: list[tuple[int, Compressor, CompressionRecord]] = []
    recovery = quantization = None
    with images_in_embeddings(images, model, teacher):
        for number, (stage, method) in enumerate(zip(stages, methods), 1):
            if stage is quantize:
                break
            start, removed, tied, skipped_before = time.perf_counter(), [], [], skipped_paths(model)
            if method is not None:
                if len(stages) > 1:
                    log.info("stage %d/%d: %s", number, len(stages), method.name)
                with timer.step("compress"):
                    record = method.compress(adapter, calib)
                gone = set(record.removed_blocks)
                record = replace(record, removed_blocks=[original[i] for i in record.removed_blocks])
                original = [b for i, b in enumerate(original) if i not in gone]
                records.append((number, method, record))
                removed, tied = record.removed_blocks, sorted(record.tie_map)
            else:
                with timer.step("recover"):
                    recovery = fine_tune(model, training.pop(number), stage, seed=cfg.seed,
                                         teacher=teacher if stage.distils else None)
            done.append(StageRecord(kind="method" if method else "recover", method=method and method.name,
                                    removed_blocks=removed, tied=tied,
                                    skipped=[p for p in skipped_paths(model) if p not in skipped_before],
                                    params_after=checkpoint.parameter_count(model),
                                    weight_bytes_after=checkpoint.weight_bytes(model),
                                    seconds=round(time.perf_counter() - start, 3)))
    records = [(n, m, m.finish(adapter, r)) for n, m, r in records]
    tie_map = shared_modules(model)  # this run's ties and those of the checkpoint it started from
    params_after = checkpoint.parameter_count(model)  # before quantization: bitsandbytes packs 2 per byte
    if quantize:
        log.info("quantizing to %s with bitsandbytes", quantize.quantize)
        start = time.perf_counter()
        with timer.step("quantize"):
            model, quantization = quantize_model(model, quantize.quantize, quantize.double_quant,
                                                 quantize.compute_dtype, tie_map)
        done.append(StageRecord(kind="quantize", params_after=params_after,
                                weight_bytes_after=checkpoint.weight_bytes(model),
                                seconds=round(time.perf_counter() - start, 3)))
    several = len(records) > 1
    details = {f"{n}:{m.name}": r.details for n, m, r in records} if several else \
        (records[0][2].details if records else {})
    artifacts = {(f"stage{n}-{name}" if several else name): content
                 for n, _, r in records for name, content in r.artifacts.items()}
    manifest = Manifest(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        base_model=BaseModelRef(name=cfg.model, kind=source.kind, location=source.location),
        method=cfg.method, config=cfg.model_dump(mode="json"),
        method_options=records[0][1].options.model_dump(mode="json") if len(records) == 1 else {},
        recipe=dump_recipe(cfg), seed=cfg.seed, data_dir=_data_source(data_dir),
        blocks_before=blocks_before, blocks_after=adapter.num_blocks,
        removed_blocks=[b for _, _, r in records for b in r.removed_blocks], tie_map=tie_map,
        skipped=skipped_paths(model),
        params_before=params_before, params_after=params_after,
        weight_bytes_before=bytes_before, weight_bytes_after=checkpoint.weight_bytes(model),
        offload=offload, distributed=distributed.record(0 if calib is None else calib.size(0)),
        quantization=quantization, recovery=recovery, stages=done, details=details,
        timings_s=timer.seconds, peak_rss_mb=peak_rss_mb(), versions=checkpoint.package_versions(),
        git_sha=checkpoint.git_sha(),
    )
    return Compressed(model, tokenizer, manifest, artifacts, processor)


def _data_source(data_dir: str | Path | None) -> str | None:
    """The data directory a run read, for its manifest (None: the Hub)."""
    root = resolve_data_dir(data_dir)
    return None if root is None else str(root.resolve())


def save(result: Compressed, out: str | Path) -> Path:
    """Write the checkpoint atomically: weights, tokenizer, manifest, recipe and charts."""
    out = Path(out)
    start = time.perf_counter()
    manifest = result.manifest
    with checkpoint.atomic_output_dir(out) as tmp:
        checkpoint.save_model_files(result.model, result.tokenizer, tmp, manifest.tie_map,
                                    manifest.config.get("max_shard_size", "5GB"), result.processor)
        for name, content in result.artifacts.items():
            (tmp / name).write_bytes(content)
        store.write_recipe(tmp, manifest.recipe)
        manifest.timings_s["save"] = round(time.perf_counter() - start, 3)
        store.write_manifest(tmp, manifest)
        store.write_card(tmp)
    return out


def compress_to_dir(cfg: CompressConfig, out: str | Path, data_dir: str | Path | None = None) -> Path:
    """Compress and save; data parallel, process 0 writes and the others wait until it has."""
    checkpoint.ensure_new_output(out)  # fail before the slow part, not after it
    result = compress(cfg, data_dir)
    if distributed.is_main():
        save(result, out)
    distributed.barrier()
    return Path(out)
