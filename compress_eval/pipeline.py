"""The one path for the data: load -> calibrate -> compress (score, remove, fuse or merge) -> recover
-> quantize -> save; a multi-stage recipe runs its methods and fine-tunes in order on the same path (the
stages themselves: ``stages``). Evaluation and recording follow in ``evaluate.evaluate_and_record``.

Each step reads the previous step's output and nothing else; the CLI commands are thin wrappers.
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress_eval import distributed
from compress_eval.config import CompressConfig, QuantizeStage, RecoverStage, dump_recipe
from compress_eval.data.calibration import calibration_windows, training_windows
from compress_eval.data.image_text import IMAGE_TEXT, image_text_windows, images_in_embeddings
from compress_eval.errors import UserError
from compress_eval.manifest import BaseModelRef, Manifest, StageRecord
from compress_eval.memory import peak_rss_mb
from compress_eval.methods.base import Compressor
from compress_eval.methods.registry import defaulted_amount, resolve_config, run_name, stage_methods
from compress_eval.methods.recovery_state import saved_state
from compress_eval.models import checkpoint
from compress_eval.models.adapters import get_adapter
from compress_eval.models.loading import load_model, load_processor, resolve_device
from compress_eval.models.sublayers import skipped_paths
from compress_eval.offload_policy import say_offload
from compress_eval.paths import data_dir as resolve_data_dir
from compress_eval.plan import resolve_offload
from compress_eval.quantize import bnb_config, require_unquantized
from compress_eval.results import store
from compress_eval.stages import MethodRun, QuantizeRun, RecoverRun, RunContext, Timer, stage_runs

log = logging.getLogger(__name__)


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


def require_whole_sublayers(methods: list[Compressor], model) -> None:
    """Refuse, before any method runs, a method that reads blocks' linears (fusion, merging) where a
    block lacks a sublayer: in the loaded checkpoint, or after an earlier sublayer stage."""
    why = "the model it is given lacks" if skipped_paths(model) else None
    for method in methods:
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
    """What a recovery stage trains on: the calibration windows, or as many consecutive sequences of a
    train split (the calibration corpus', or the one the stage names) as its steps take (each once)."""
    if stage.recover_data == "calibration":
        return calib
    corpus = cfg.calib_data if stage.recover_data == "train" else stage.recover_data
    return training_windows(tokenizer, corpus, stage.recover_steps * stage.recover_batch_size,
                            stage.recover_seqlen or cfg.seqlen, data_dir)


def compress(cfg: CompressConfig, data_dir: str | Path | None = None, state_dir: Path | None = None) -> Compressed:
    """Compress ``cfg.model`` in memory: its stages in order (methods, recovery fine-tunes), each
    method's finishing step, then quantization; each stage recorded in the manifest.

    What is compressed is said at DEBUG (the log file); INFO is for notices (a default amount, an
    offloaded model, a recipe's stages), so input refused once the model is loaded (a block out of
    range) is still answered by its one error line alone."""
    default = defaulted_amount(cfg)
    cfg = resolve_config(cfg)
    runs = stage_runs(cfg, stage_methods(cfg))  # validates the methods and their options before any heavy work
    for run in runs:  # and a state directory a fine-tune is to resume from
        if isinstance(run, RecoverRun) and run.stage.recover_resume is not None:
            saved_state(Path(run.stage.recover_resume))
    if isinstance(runs[-1], QuantizeRun):
        bnb_config(runs[-1].stage.quantize, runs[-1].stage.double_quant, runs[-1].stage.compute_dtype)  # installed?
    context, processor, tokenizer, source, offload = _load(cfg, runs)
    context.state_dir = state_dir
    before = _size(context)
    calib, images = _calibrate(context, runs, processor, tokenizer, data_dir)
    log.debug("compressing %s (%d blocks) with %s", cfg.model, context.adapter.num_blocks, cfg.method)
    if default:
        log.info("no amount given: %s (%s's default)", default, cfg.method)
    if any(isinstance(r, RecoverRun) and r.stage.distils for r in runs):
        context.teacher = distillation_teacher(context.model, source, cfg, offload)
    with images_in_embeddings(images, context.model, context.teacher):
        done = [r.run(context.model, calib, context) for r in runs if r.on_floats]
    context.finish()
    done += [r.run(context.model, calib, context) for r in runs if not r.on_floats]
    base = BaseModelRef(name=cfg.model, kind=source.kind, location=source.location)
    manifest = _manifest(context, done, {**before, "base_model": base, "offload": offload,
                                         "distributed": distributed.record(0 if calib is None else calib.size(0))},
                         data_dir)
    artifacts = {(f"stage{n}-{name}" if len(context.records) > 1 else name): content
                 for n, _, r in context.records for name, content in r.artifacts.items()}
    return Compressed(context.model, tokenizer, manifest, artifacts, processor)


def _load(cfg: CompressConfig, runs: list) -> tuple:
    """The model placed as the plan says, checked for what the stages need, in a fresh run context."""
    offload, reason = placement(cfg)
    torch.manual_seed(cfg.seed)
    timer = Timer()
    with timer.step("load"):
        model, tokenizer, source = load_model(cfg.model, cfg.device, cfg.dtype, cfg.allow_pickle,
                                              cfg.trust_remote_code, offload, cfg.offload_dir)
        processor = load_processor(model, cfg.model, cfg.trust_remote_code)
    adapter = get_adapter(model)
    if reads_calibration(runs):  # before the notice: a refused run says one line, its error
        adapter.require_context(cfg.seqlen, "--seqlen")
    say_offload(offload, reason)
    require_unquantized(model, cfg.model)
    require_whole_sublayers([r.method for r in runs if isinstance(r, MethodRun)], model)
    context = RunContext(cfg, model, adapter, len(runs), timer)
    return context, processor, tokenizer, source, offload


def reads_calibration(runs: list) -> bool:
    return any(isinstance(r, RecoverRun) or (isinstance(r, MethodRun) and r.method.needs_calibration) for r in runs)


def _calibrate(context: RunContext, runs: list, processor, tokenizer, data_dir) -> tuple:
    """The calibration windows (and a VLM's images) the stages read, and each recovery stage's text, read
    now: a missing train split fails before any method runs. None where no stage reads them."""
    cfg, model = context.cfg, context.model
    if not reads_calibration(runs):
        return None, None
    images = None
    with context.timer.step("calibrate"):
        if cfg.calib_data in IMAGE_TEXT:
            images = image_text_windows(model, processor, cfg.calib_data, cfg.calib_samples, cfg.seqlen, cfg.seed)
            calib = images.ids
        else:
            calib = calibration_windows(tokenizer, cfg.calib_data, cfg.calib_samples, cfg.seqlen, cfg.seed, data_dir)
        for run in (r for r in runs if isinstance(r, RecoverRun)):
            if images is not None and run.stage.recover_data == "train":
                context.training[run.number] = image_text_training(run, context, processor, images)
            else:
                context.training[run.number] = recovery_windows(run.stage, calib, tokenizer, cfg, data_dir)
    return calib, images


def image_text_training(run, context: RunContext, processor, images) -> torch.Tensor:
    """An image-text recovery stage's own windows of easy-vqa's train split (its steps x batch of them, in
    another seeded order than the calibration's), their image features added to those the hook puts in."""
    cfg, stage = context.cfg, run.stage
    windows = image_text_windows(context.model, processor, cfg.calib_data, stage.recover_steps *
                                 stage.recover_batch_size, stage.recover_seqlen or cfg.seqlen, cfg.seed + run.number)
    images.features.update(windows.features)
    return windows.ids


def _size(context: RunContext) -> dict:
    """The model's size before any stage, for the manifest."""
    return dict(blocks_before=context.adapter.num_blocks, params_before=checkpoint.parameter_count(context.model),
                weight_bytes_before=checkpoint.weight_bytes(context.model))


def _manifest(context: RunContext, done: list[StageRecord], known: dict, data_dir) -> Manifest:
    """The manifest of a finished run: its config, each stage's record, the sizes after; ``known``: what the
    run knew before its stages (base model, sizes before, placement)."""
    cfg, records, model = context.cfg, context.records, context.model
    several = len(records) > 1
    details = {f"{n}:{m.name}": r.details for n, m, r in records} if several else \
        (records[0][2].details if records else {})
    return Manifest(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        method=cfg.method, config=cfg.model_dump(mode="json"),
        method_options=records[0][1].options.model_dump(mode="json") if len(records) == 1 else {},
        recipe=dump_recipe(cfg), seed=cfg.seed, data_dir=_data_source(data_dir), **known,
        blocks_after=context.adapter.num_blocks,
        removed_blocks=[b for _, _, r in records for b in r.removed_blocks], tie_map=context.tie_map,
        skipped=skipped_paths(model), params_after=context.params_after,
        weight_bytes_after=checkpoint.weight_bytes(model),
        quantization=context.quantization, recovery=context.recovery, stages=done, details=details,
        timings_s=context.timer.seconds, peak_rss_mb=peak_rss_mb(), versions=checkpoint.package_versions(),
        git_sha=checkpoint.git_sha(),
    )


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
        store.write_artifacts(tmp, result.artifacts)
        store.write_recipe(tmp, manifest.recipe)
        manifest.timings_s["save"] = round(time.perf_counter() - start, 3)
        store.write_manifest(tmp, manifest)
        store.write_card(tmp)
    return out


def compress_to_dir(cfg: CompressConfig, out: str | Path | None, data_dir: str | Path | None = None,
                    state_dir: Path | None = None) -> Path:
    """Compress and save (``out`` None: to ``runs/`` :func:`~compress_eval.methods.registry.run_name`); data
    parallel, process 0 writes and the others wait until it has. ``state_dir``: where recovery stages keep
    their resumable state unless they name their own ``recover_resume``."""
    out = Path("runs") / run_name(resolve_config(cfg)) if out is None else out
    checkpoint.ensure_new_output(out)  # fail before the slow part, not after it
    result = compress(cfg, data_dir, state_dir)
    if distributed.is_main():
        save(result, out)
    distributed.barrier()
    return Path(out)
