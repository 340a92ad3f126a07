"""Checkpoints: safetensors + config + tokenizer + a ``compress_eval.json`` manifest, written atomically.

A depth-pruned checkpoint is a plain transformers directory (``AutoModelForCausalLM`` loads it at the
new depth); the manifest records what was done so any result can be re-made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from compress_eval.errors import UserError
from compress_eval.jsonfile import JSONFileError, read_json_object, user_modes, write_json_atomic

MANIFEST = "compress_eval.json"
FORMAT = "compress-eval/1"
log = logging.getLogger(__name__)


def ensure_new_output(out: str | Path) -> Path:
    """``out`` if a run may create it: it does not exist yet and its parent can be written (checked
    by creating and removing a probe directory, before any slow work)."""
    out = Path(out)
    if out.exists():
        raise UserError(f"output directory {out} already exists: choose another --out or remove it")
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create output directory {out}: {existing} is a file, not a directory; "
                        f"choose another --out")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".compress-eval-probe-", dir=existing))
    except OSError as exc:
        raise UserError(f"cannot create output directory {out}: {existing} is not writable "
                        f"({exc.strerror or exc}); choose another --out") from None
    return out


TEMP_INFIX = ".tmp-"


def temp_dirs(out: Path) -> list[Path]:
    """Temporary directories of writers of ``out`` (named ``.NAME.tmp-PID-XXXX``)."""
    return sorted(out.parent.glob(f".{out.name}{TEMP_INFIX}*"))


def _writer_alive(tmp: Path, out: Path) -> bool:
    pid = tmp.name[len(f".{out.name}{TEMP_INFIX}"):].split("-", 1)[0]
    if not pid.isdigit():
        return False  # an older naming without a pid: nobody can be writing it any more
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_dirs(out: str | Path) -> list[Path]:
    """Remove the temp dirs of ``out`` whose writer process is gone (killed by SIGKILL, a crashed
    machine); those of live writers are left alone. Returns what was removed."""
    out = Path(out)
    stale = [tmp for tmp in temp_dirs(out) if not _writer_alive(tmp, out)]
    for tmp in stale:
        log.warning("removing %s, left by a killed run", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    return stale


@contextlib.contextmanager
def atomic_output_dir(out: str | Path):
    """Yield a temp directory beside ``out`` that becomes ``out`` only if the block succeeds.

    The temp dir's name carries this process's id, so a later run can tell a killed writer's
    leftovers (removed) from a live concurrent writer's (left alone; the second rename fails)."""
    out = ensure_new_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_INFIX}{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp's 0700 and some writers' 0600
            user_modes(path)
        try:
            tmp.rename(out)
        except OSError:
            if out.exists():
                raise UserError(f"output directory {out} was created by another run while this one was "
                                f"writing; nothing of this run was kept: choose another --out") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters counted once per storage (tied embeddings and tied FF modules count once)."""
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already de-duplicates shared Parameters
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages (what a checkpoint must hold)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def package_versions() -> dict[str, str]:
    names = ["compress-eval", "torch", "transformers", "lm_eval", "peft", "bitsandbytes", "accelerate"]
    out = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def git_sha() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def write_manifest(directory: Path, manifest: dict) -> None:
    write_json_atomic(Path(directory) / MANIFEST, manifest)


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a checkpoint directory, None if it has none; a corrupt one is a UserError."""
    try:
        return read_json_object(Path(directory) / MANIFEST)
    except JSONFileError as exc:
        raise UserError(f"corrupt manifest: {exc}; re-run the compression that made it") from None


@contextlib.contextmanager
def copies_detached(model: torch.nn.Module, tie_map: dict[str, str]):
    """Within the block, each tie-map copy is an empty module, so a save stores a tied module once
    (safetensors refuses shared storage, and a quantized model's save ignores a given state dict);
    the sharing is restored on exit, as ``retie`` restores it on load."""
    for dst in tie_map:
        parent, _, name = dst.rpartition(".")
        setattr(_module(model, parent) if parent else model, name, torch.nn.Module())
    try:
        yield model
    finally:
        retie(model, tie_map)


def save_model_files(model, tokenizer, directory: Path, tie_map: dict[str, str] | None = None) -> None:
    """Weights as safetensors (never pickle), config, generation config and tokenizer."""
    with copies_detached(model, tie_map or {}):
        model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def _module(root: torch.nn.Module, dotted: str) -> torch.nn.Module:
    return root.get_submodule(dotted)


def retie(model: torch.nn.Module, tie_map: dict[str, str]) -> None:
    """Make every module path in ``tie_map`` the very module it maps to (one tensor in memory)."""
    for dst, src in tie_map.items():
        parent, _, name = dst.rpartition(".")
        setattr(_module(model, parent) if parent else model, name, _module(model, src))


def load_checkpoint(directory: str | Path, dtype: torch.dtype | None = None, device: str | None = None):
    """(model, manifest) for one of our checkpoint directories, with its tie map re-applied.
    A bitsandbytes checkpoint is loaded straight onto ``device`` (its weights cannot be cast)."""
    from compress_eval.models.registry import auto_model_class

    manifest = read_manifest(directory) or {}
    tie_map = manifest.get("tie_map") or {}
    placement = {}
    if manifest.get("quantization"):
        from compress_eval.quantize import quiet_int8_cast_warning

        quiet_int8_cast_warning()
        placement = {"device_map": {"": device}} if device else {}
    model = from_pretrained_tied(auto_model_class(str(directory)), directory, tie_map, dtype=dtype, **placement)
    retie(model, tie_map)
    if manifest.get("quantization"):
        from compress_eval.quantize import keep_4bit_scales_on_save

        keep_4bit_scales_on_save(model)  # a re-save after inference keeps the scales it was loaded with
    return model, manifest


def from_pretrained_tied(cls, directory, tie_map: dict[str, str], **kwargs):
    """``cls.from_pretrained`` without transformers' "MISSING" report for the tie map's copies,
    which are absent on purpose (one copy on disk); any other missing tensor is still reported."""
    if not tie_map:
        return cls.from_pretrained(directory, **kwargs)
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(directory, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    prefixes = tuple(f"{path}." for path in tie_map)
    missing = [k for k in info["missing_keys"] if not k.startswith(prefixes)]
    if missing:
        log.warning("checkpoint %s lacks %d tensors (newly initialized): %s",
                                            directory, len(missing), ", ".join(missing[:5]))
    return model
