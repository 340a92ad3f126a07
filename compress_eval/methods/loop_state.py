"""Resumable state of an iterative block-removal loop (FuseGPT's ``--resume DIR``).

After each finished iteration the loop writes the blocks it changed (one safetensors file per block,
named by original index and iteration) and then replaces ``state.json`` atomically; the state is
whatever ``state.json`` names, so a crash mid-write leaves the previous iteration's state intact.
The per-iteration random generators are seeded by (seed, iteration), so a resumed run gives the
same result as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compress_eval.errors import UserError, no_space_is_one_line
from compress_eval.jsonfile import JSONFileError, read_json_object, write_json_atomic

STATE = "state.json"


class LoopState:
    def __init__(self, directory: str | Path, fingerprint: dict):
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        """The saved state, or None for a fresh start; a state of another run is an error."""
        try:
            state = read_json_object(self.dir / STATE)
        except JSONFileError as exc:
            raise UserError(f"--resume {self.dir}: {exc}; remove the directory to start afresh") from None
        if state is None:
            return None
        if not (isinstance(state.get("fingerprint"), dict) and isinstance(state.get("alive"), list)
                and isinstance(state.get("iterations"), list) and isinstance(state.get("files", {}), dict)):
            raise UserError(f"--resume {self.dir}: {STATE} lacks fingerprint/alive/iterations (not a state "
                            f"this tool wrote); remove the directory to start afresh")
        if state["fingerprint"] != self.fingerprint:
            diff = sorted(k for k in self.fingerprint if state["fingerprint"].get(k) != self.fingerprint[k])
            raise UserError(f"--resume {self.dir}: the saved state is of a different run (differs in "
                            f"{', '.join(diff)}); use a new directory or the same settings")
        return state

    def restore(self, adapter, state: dict) -> None:
        """Cut the freshly loaded model to the saved blocks and load the changed ones."""
        alive = state["alive"]
        adapter.keep_blocks(alive)
        for orig, name in state["files"].items():
            try:
                i = alive.index(int(orig))
                with adapter.hold([i], write=True):
                    adapter.blocks[i].load_state_dict(load_file(self.dir / name))
            except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
                raise UserError(f"--resume {self.dir}: cannot restore block {orig} from {name} "
                                f"({str(exc).splitlines()[0]}); remove the directory to start afresh") from None

    def save(self, state: dict, changed: dict[int, object], iteration: int) -> dict:
        """Write the changed blocks (original index -> module), then state.json; returns the new state."""
        self.dir.mkdir(parents=True, exist_ok=True)
        files = {orig: name for orig, name in state.get("files", {}).items() if int(orig) in state["alive"]}
        kept, written = set(state.get("files", {}).values()), []
        try:
            with no_space_is_one_line(f"the --resume state in {self.dir}", "the state of the previous iteration "
                                      "is kept, to resume from"):
                for orig, block in changed.items():
                    written.append(self.dir / f"block{orig}-iter{iteration}.safetensors")
                    save_file({k: v.contiguous() for k, v in block.state_dict().items()}, written[-1])
                    files[str(orig)] = written[-1].name
                state = {**state, "files": files, "fingerprint": self.fingerprint}
                write_json_atomic(self.dir / STATE, state)
        except BaseException:  # the previous state.json names the previous files: only this call's go
            for path in written:
                if path.name not in kept:
                    path.unlink(missing_ok=True)
            raise
        for stale in self.dir.glob("block*.safetensors"):
            if stale.name not in files.values():
                stale.unlink()
        return state
