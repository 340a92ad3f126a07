"""Resumable state of a recovery fine-tune (``recover_resume DIR``).

A heal of 1,000 steps takes hours on a CPU and may be preempted on a GPU. Every ``recover_save_every``
steps the fine-tune writes what the next step depends on: the trainable tensors, the optimizer and
schedule, the losses so far and the random generators (LoRA dropout draws from them). Each save goes
to a fresh ``step-N`` directory, and ``state.json`` is then replaced atomically to name it, so a crash
mid-write leaves the previous save in force. A run with the same model, data and settings continues
from the named step and ends with the same weights as an uninterrupted one; a finished state is kept,
so a run killed after its fine-tune (in the save, or a later stage) does not train again.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compress_eval.errors import UserError, no_space_is_one_line
from compress_eval.jsonfile import JSONFileError, read_json_object, write_json_atomic

log = logging.getLogger(__name__)

STATE = "state.json"
TENSORS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"


def digest(*tensors: torch.Tensor) -> str:
    """sha256 (16 hex) of the tensors' bytes in order: the identity of a run's data and starting weights."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_digest(model: torch.nn.Module) -> str:
    return digest(*(t for _, t in sorted(model.state_dict().items())))


def saved_state(directory: Path) -> dict | None:
    """The state saved in ``directory``, or None where there is none yet; anything else there is one
    line. Also asked before a run's first stage, so a bad directory is refused before any work."""
    def refuse(why: str) -> UserError:
        return UserError(f"--recover-resume {directory}: {why}; remove the directory to start afresh")

    if directory.exists() and not directory.is_dir():
        raise UserError(f"--recover-resume {directory} is a file: name a directory for the fine-tune's state")
    try:
        state = read_json_object(directory / STATE)
    except JSONFileError as exc:
        raise refuse(str(exc)) from None
    if state is not None and not (isinstance(state.get("fingerprint"), dict) and isinstance(state.get("step"), int)
                                  and isinstance(state.get("losses"), list) and isinstance(state.get("dir"), str)):
        raise refuse(f"{STATE} lacks fingerprint/step/losses/dir (not a state this tool wrote)")
    return state


class FineTuneState:
    """``replace_other``: a state of another fine-tune is discarded (a batch's own bookkeeping, where a
    changed recipe or thread count must not fail the cell) rather than refused (a directory the user named)."""

    def __init__(self, directory: str | Path, fingerprint: dict, replace_other: bool = False):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.replace_other = replace_other
        self.current: str | None = None  # the step directory state.json names (load and save keep it)

    def load(self) -> dict | None:
        """The saved state (``step``, ``losses``, ``dir``) of this fine-tune, or None for a fresh start."""
        state = saved_state(self.dir)
        if state is None:
            return None
        if state["fingerprint"] != self.fingerprint:
            diff = sorted(k for k in self.fingerprint if state["fingerprint"].get(k) != self.fingerprint[k])
            if self.replace_other:
                log.warning("%s holds another fine-tune's state (differs in %s): starting afresh", self.dir,
                            ", ".join(diff))
                shutil.rmtree(self.dir)
                return None
            raise UserError(f"--recover-resume {self.dir}: the saved fine-tune is of a different run (differs in "
                            f"{', '.join(diff)}); use a new directory or the same model, data and settings")
        self.current = state["dir"]
        return state

    def restore(self, state: dict, named: dict[str, torch.nn.Parameter], optimizer, schedule) -> None:
        """Put the saved trainable tensors, optimizer, schedule and generators back."""
        step_dir = self.dir / state["dir"]
        try:
            tensors = load_file(step_dir / TENSORS)
            extra = torch.load(step_dir / OPTIMIZER, weights_only=True)
            with torch.no_grad():
                for name, param in named.items():
                    param.copy_(tensors[name])
            optimizer.load_state_dict(extra["optimizer"])
            schedule.load_state_dict(extra["schedule"])
        except (OSError, SafetensorError, RuntimeError, KeyError, ValueError) as exc:
            raise UserError(f"--recover-resume {self.dir}: cannot restore step {state['step']} from "
                            f"{step_dir.name} ({str(exc).splitlines()[0]}); remove the directory to start afresh"
                            ) from None
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])

    def save(self, step: int, losses: list[float], named: dict[str, torch.nn.Parameter], optimizer,
             schedule) -> None:
        """Write step ``step``'s state beside the previous one, then name it in state.json (after
        :meth:`load`, which says what the previous one is)."""
        step_dir = self.dir / f"step-{step}"
        if self.current == step_dir.name:
            return
        rng = {"rng.cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["rng.cuda"] = torch.cuda.get_rng_state()
        try:
            with no_space_is_one_line(f"the --recover-resume state in {self.dir}",
                                      "the previous save is kept, to resume from"):
                shutil.rmtree(step_dir, ignore_errors=True)
                step_dir.mkdir(parents=True)
                save_file({**{n: p.detach().contiguous().cpu() for n, p in named.items()}, **rng},
                          step_dir / TENSORS)
                torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
                           step_dir / OPTIMIZER)
                write_json_atomic(self.dir / STATE, {"fingerprint": self.fingerprint, "step": step,
                                                     "losses": losses, "dir": step_dir.name})
        except BaseException:
            shutil.rmtree(step_dir, ignore_errors=True)
            raise
        if self.current is not None:
            shutil.rmtree(self.dir / self.current, ignore_errors=True)
        self.current = step_dir.name
