"""Checkpoint directories on disk: created atomically (temp dir + rename, stale temp dirs of killed
writers removed), model files written as safetensors, sizes and provenance measured.

A depth-pruned checkpoint is a plain transformers directory (``AutoModelForCausalLM`` loads it at the
new depth). What else a run directory holds (manifest, recipe, results) is ``results.store``'s.
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

from compress_eval.errors import UserError, no_space_is_one_line
from compress_eval.jsonfile import user_modes
from compress_eval.models.loading import copies_detached
from compress_eval.models.offload import offloader_of, save_sharded, tensor_slots
from compress_eval.sizes import parse_memory

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
    with no_space_is_one_line(str(out), "nothing of it was kept"), _temp_dir_for(out) as tmp:
        yield tmp


@contextlib.contextmanager
def _temp_dir_for(out: Path):
    """The temp directory of ``atomic_output_dir``: renamed to ``out`` on success, removed otherwise."""
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


def _storage(t: torch.Tensor):
    """What identifies a tensor's storage: its address, or for an offloaded placeholder (meta,
    no address) the placeholder itself (a tied placeholder is one object)."""
    return id(t) if t.is_meta else t.data_ptr()


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters counted once per storage (tied embeddings and tied FF modules count once)."""
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already de-duplicates shared Parameters
        if _storage(p) not in seen:
            seen.add(_storage(p))
            total += p.numel()
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct tensors of the state dict: what a checkpoint holds (a tied module once;
    quantization scales and codebooks included, non-persistent buffers not). The one definition, before
    and after compression alike."""
    if offloader_of(model) is not None:  # placeholders: state_dict() would detach them into new objects
        return sum({id(t): t.nbytes for *_, t in tensor_slots(model)}.values())
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
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


def save_model_files(model, tokenizer, directory: Path, tie_map: dict[str, str] | None = None,
                     max_shard_size: str = "5GB", processor=None) -> None:
    """Weights as safetensors (never pickle) in shards of at most ``max_shard_size``, config,
    generation config, tokenizer and a VLM's processor (``AutoProcessor`` loads the checkpoint as it
    loaded the source). An offloaded model is written unit by unit."""
    offloader = offloader_of(model)
    with copies_detached(model, tie_map or {}):
        if offloader is None:
            model.save_pretrained(directory, safe_serialization=True, max_shard_size=parse_memory(max_shard_size))
        else:
            model.config.architectures = [type(model).__name__]
            model.config.save_pretrained(directory)
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(directory)
            save_sharded(offloader, directory, parse_memory(max_shard_size))
    for part in (tokenizer, processor):
        if part is not None:
            part.save_pretrained(directory)
