"""Layer-by-layer execution of a model larger than memory (``--offload cpu|disk``).

The model is built on the meta device (its shapes, no storage) and its weights are cut into *units*:
every decoder block, and every other part that holds parameters (embeddings, final norm, LM head;
parts sharing a tensor, like tied embeddings and head, form one unit). A unit's weights are kept in a
store, host tensors (``cpu``) or the safetensors files they came from (``disk``), and are put on the
device only while the unit runs: a forward pre-hook loads them, a forward hook puts the meta
placeholders back. Everything that runs a model block by block (prefix states, scoring, features,
perplexity) works unchanged, and so does a full forward of the model.

A method that reads or changes weights outside a forward holds the units (:meth:`Offloader.hold`);
with ``write=True`` the units' current tensors, whatever modules now hold them (a fused linear, a
merged FF), become the stored state. ``disk`` writes changed units to a work directory beside the
untouched source files; the source files are never written.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
import tempfile
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from compress_eval.errors import UserError
from compress_eval.progress import bar

log = logging.getLogger(__name__)

MODES = ("auto", "none", "cpu", "disk")
_ATTR = "_compress_eval_offloader"

# A tensor's home in the store: a host tensor, or (safetensors file, key).
Source = torch.Tensor | tuple[str, str]


def return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system at once (mmap above 1 MiB).

    An offloaded run loads and frees a block's tensors over and over; by default glibc keeps freed
    heap memory for reuse, fragmented, and the process's resident size creeps up to a multiple of
    one block. Measured on the 1.2 B scale model: 15-20 % lower peak RSS (bench/results/scale_1b.md)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; also ends glibc's dynamic raising of it


def offloader_of(model: nn.Module) -> "Offloader | None":
    return getattr(model, _ATTR, None)


def execution_device(model: nn.Module) -> torch.device:
    """Where the model computes: the offloader's device, or that of its first parameter."""
    offloader = offloader_of(model)
    return offloader.device if offloader is not None else next(model.parameters()).device


def tensor_slots(root: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool, torch.Tensor]]:
    """(name under root, owning module, attribute, is parameter, tensor) for every parameter and
    persistent buffer under ``root``, a tied tensor once per place it is used."""
    for prefix, module in root.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is not None:
                yield f"{prefix}.{attr}" if prefix else attr, module, attr, True, p
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                yield f"{prefix}.{attr}" if prefix else attr, module, attr, False, b


def _full_name(root_name: str, name: str) -> str:
    """A tensor's name in the model from its root's module path and its name under the root."""
    return f"{root_name}.{name}" if root_name else name


def _put(module: nn.Module, attr: str, is_param: bool, tensor: torch.Tensor) -> None:
    (module._parameters if is_param else module._buffers)[attr] = tensor


def _placeholder(tensor: torch.Tensor, is_param: bool) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, requires_grad=False) if is_param else meta


@dataclass(eq=False)
class Unit:
    """Modules whose weights move together: one block, or a part outside the blocks (parts sharing a
    tensor, like tied embeddings and head, share a unit)."""

    roots: list[nn.Module]
    loaded: list[tuple[nn.Module, str, bool, torch.Tensor]] = field(default_factory=list)
    holds: int = 0

    def slots(self):
        for k, root in enumerate(self.roots):
            for name, module, attr, is_param, tensor in tensor_slots(root):
                yield k, name, module, attr, is_param, tensor


def _unit_roots(model: nn.Module, blocks: nn.ModuleList) -> list[list[nn.Module]]:
    """The blocks one by one, then each maximal module outside them that holds parameters; parts
    sharing a parameter are merged into one unit."""
    roots: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if module is blocks:
            roots.extend(blocks)
            return
        if any(m is blocks for m in module.modules()):
            for child in module.children():
                visit(child)
        elif any(True for _ in module.parameters()):
            roots.append(module)

    visit(model)
    owner: dict[int, int] = {}  # id(parameter) -> group
    groups: list[list[nn.Module]] = []
    for root in roots:
        shared = {owner[id(p)] for p in root.parameters() if id(p) in owner}
        if shared:
            target = min(shared)
            for g in sorted(shared - {target}, reverse=True):
                groups[target].extend(groups[g])
                groups[g] = []
        else:
            target = len(groups)
            groups.append([])
        groups[target].append(root)
        for root_ in groups[target]:
            for p in root_.parameters():
                owner[id(p)] = target
    return [g for g in groups if g]


def _read(sources: list[Source]) -> list[torch.Tensor]:
    """The tensors of a list of sources, each file opened once."""
    out: list[torch.Tensor | None] = [s if isinstance(s, torch.Tensor) else None for s in sources]
    by_file: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sources):
        if not isinstance(s, torch.Tensor):
            by_file[s[0]].append(i)
    if by_file:
        from safetensors import safe_open

        for path, indices in by_file.items():
            with safe_open(path, framework="pt", device="cpu") as f:
                for i in indices:
                    out[i] = f.get_tensor(sources[i][1])
    return out  # type: ignore[return-value]


class Offloader:
    """The units of one model, the store of their tensors, and the hooks that load a unit while it runs.

    The store is keyed by placeholder: every offloaded tensor is a meta tensor in the model, and
    ``home`` says where its values are. A tensor shared by several units (a merged FF module tied
    across blocks) is one placeholder with one home, whichever unit loads it.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, mode: str, device: torch.device | str,
                 dtype: torch.dtype, sources: dict[str, Source], workdir: str | Path | None = None):
        if mode not in ("cpu", "disk"):
            raise ValueError(f"offload mode must be cpu or disk, got {mode!r}")
        self.model, self.mode, self.device, self.dtype = model, mode, torch.device(device), dtype
        return_freed_memory()
        self._workdir = None
        if mode == "disk":  # changed units; removed with the offloader, or at exit
            try:
                self._workdir = Path(tempfile.mkdtemp(prefix="compress-eval-offload-", dir=workdir))
            except OSError as exc:
                raise UserError(f"--offload-dir {workdir}: cannot create a work directory there "
                                f"({exc.strerror or exc}); give a writable directory") from None
            weakref.finalize(self, shutil.rmtree, self._workdir, True)
        self._counter = itertools.count()
        self.home: dict[int, tuple[torch.Tensor, Source]] = {}  # id(placeholder) -> (placeholder, source)
        self.units: list[Unit] = []
        self._by_root: dict[int, Unit] = {}
        names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        unnamed: dict[int, str] = {}
        for roots in _unit_roots(model, blocks):
            unit = Unit(roots)
            for k, name, *_, t in unit.slots():
                full = _full_name(names[id(roots[k])], name)
                if full in sources:
                    self.home[id(t)] = (t, sources[full])
                elif id(t) not in self.home:
                    unnamed[id(t)] = full
            self._add(unit)
        covered = {id(t) for u in self.units for *_, t in u.slots()}
        loose = next((n for n, p in model.named_parameters() if id(p) not in covered), None)
        if loose is not None:  # a parameter of a module that holds the blocks (LLaVA-NeXT's image_newline)
            raise UserError(f"cannot offload {type(model).__name__}: its parameter {loose!r} lies outside every "
                            f"block and part that offloading moves; use --offload none")
        missing = [full for i, full in unnamed.items() if i not in self.home]
        if missing:
            raise UserError(f"cannot offload the model: its checkpoint has no tensor {missing[0]!r} "
                            f"(saved under other names); use --offload none")
        self.move(self.device)  # what is not in a unit (rotary tables, masks) stays on the device
        setattr(model, _ATTR, self)
        model.to = self.move  # what callers mean by it (lm-eval's HFLM does it): compute there

    def move(self, *args, **kwargs) -> nn.Module:
        """``model.to(device)`` of an offloaded model: the device it computes on moves (with the
        tensors that stay there); the weights stay where they are kept."""
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != self.dtype:
            raise UserError(f"an offloaded model runs in {self.dtype}; load it with that dtype instead of "
                            f"casting it to {dtype}")
        if device is not None:
            self.device = torch.device(device)
            for module in self.model.modules():
                for attr, b in list(module._buffers.items()):
                    if b is not None and not b.is_meta:
                        module._buffers[attr] = b.to(self.device)
        return self.model

    def _add(self, unit: Unit) -> None:
        self.units.append(unit)
        for root in unit.roots:
            self._by_root[id(root)] = unit
            root.register_forward_pre_hook(self._pre_hook)
            root.register_forward_hook(self._post_hook)

    # --- loading and releasing -----------------------------------------------------------------
    def _pre_hook(self, module, args):
        self.load(self._by_root[id(module)])

    def _post_hook(self, module, args, output):
        unit = self._by_root[id(module)]
        if unit.holds == 0:
            self.release(unit)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(self.device, dtype)

    def load(self, unit: Unit) -> None:
        """Put the stored values on the device wherever the unit has a placeholder (a module a method
        swapped in keeps its own tensors)."""
        todo = [(module, attr, is_param, t) for *_, module, attr, is_param, t in unit.slots() if t.is_meta]
        wanted = list(dict.fromkeys(id(t) for *_, t in todo))
        values = dict(zip(wanted, _read([self.home[i][1] for i in wanted])))
        made: dict[int, torch.Tensor] = {}
        for module, attr, is_param, t in todo:
            if id(t) not in made:
                value = self._to_device(values[id(t)])
                made[id(t)] = nn.Parameter(value, requires_grad=False) if is_param else value
            _put(module, attr, is_param, made[id(t)])
            unit.loaded.append((module, attr, is_param, t))

    def release(self, unit: Unit) -> None:
        """Put back the placeholders of what :meth:`load` loaded."""
        for module, attr, is_param, placeholder in unit.loaded:
            _put(module, attr, is_param, placeholder)
        unit.loaded.clear()

    def commit(self, unit: Unit) -> None:
        """Store the unit's current tensors as its state and put placeholders in their place."""
        unit.loaded.clear()
        fresh: dict[int, tuple[torch.Tensor, torch.Tensor, str]] = {}  # id(real) -> (real, placeholder, key)
        for k, name, module, attr, is_param, t in unit.slots():
            if t.is_meta:
                continue
            if id(t) not in fresh:
                fresh[id(t)] = (t.detach(), _placeholder(t, is_param), f"{k}.{name}")
            _put(module, attr, is_param, fresh[id(t)][1])
        if not fresh:
            return
        if self.mode == "cpu":
            stored = [t.to("cpu") for t, _, _ in fresh.values()]
        else:
            from safetensors.torch import save_file

            path = self._workdir / f"unit{next(self._counter)}.safetensors"
            save_file({key: t.contiguous().cpu() for t, _, key in fresh.values()}, str(path))
            stored = [(str(path), key) for _, _, key in fresh.values()]
        for (_, placeholder, _), source in zip(fresh.values(), stored):
            self.home[id(placeholder)] = (placeholder, source)

    @contextlib.contextmanager
    def hold(self, modules: list[nn.Module], write: bool = False):
        """Keep the units of ``modules`` (blocks or parts) on the device within the block; with
        ``write``, what they hold on exit is stored as their new state."""
        units = list(dict.fromkeys(self._by_root[id(m)] for m in modules))
        for unit in units:
            unit.holds += 1
            self.load(unit)
        ok = False
        try:
            yield
            ok = True
        finally:
            for unit in units:
                unit.holds -= 1
                if unit.holds == 0:
                    (self.commit if write and ok else self.release)(unit)
            if write and ok:
                self.forget_missing()

    def forget_missing(self) -> None:
        """Drop what the model no longer uses (removed blocks, replaced modules) from the store."""
        present = {id(m) for m in self.model.modules()}
        self.units = [u for u in self.units if any(id(r) in present for r in u.roots)]
        self._by_root = {id(r): u for u in self.units for r in u.roots}
        used = {id(t) for u in self.units for *_, t in u.slots()}
        self.home = {i: v for i, v in self.home.items() if i in used}

    def units_in_order(self) -> list[Unit]:
        """The model's units in module order (the order a checkpoint lists its tensors in)."""
        order = {id(m): i for i, m in enumerate(self.model.modules())}
        return sorted(self.units, key=lambda u: min(order.get(id(r), 1 << 62) for r in u.roots))


def hold(model: nn.Module, modules: list[nn.Module], write: bool = False):
    """:meth:`Offloader.hold` for an offloaded model; nothing to do for one in memory."""
    offloader = offloader_of(model)
    return offloader.hold(modules, write) if offloader is not None else contextlib.nullcontext()


# --- sources: where a checkpoint keeps each tensor ------------------------------------------------
def checkpoint_sources(directory: str | Path) -> dict[str, tuple[str, str]]:
    """Tensor name -> (safetensors file, key) of a model directory (sharded with an index, or not)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: (str(directory / file), name) for name, file in weight_map.items()}
    from safetensors import safe_open

    sources: dict[str, tuple[str, str]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            sources.update({name: (str(path), name) for name in f.keys()})
    if not sources:
        raise UserError(f"--offload needs safetensors weights, and {directory} has none: "
                        f"convert the checkpoint, or use --offload none")
    return sources


def _conversions(model: nn.Module, reverse: bool) -> tuple[list, list]:
    """(renamings, converters) between the model's module names and its checkpoint names, as transformers
    applies them in ``from_pretrained`` (``reverse``: as ``save_pretrained`` does). A llava-hf checkpoint
    keeps its legacy names (``language_model.model.layers``) for what the module calls
    ``model.language_model.layers``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter

    conversions = get_model_conversion_mapping(model, add_legacy=not reverse)
    if reverse:  # the order and skips of transformers' revert_weight_conversion (a model built from its config)
        conversions = [c.reverse_transform() for c in conversions[::-1] if not isinstance(c, PrefixChange)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    return [c for c in conversions if not isinstance(c, WeightConverter)], converters


def _renamed(model: nn.Module, names: list[str], reverse: bool) -> dict[str, str]:
    """Each name -> its checkpoint name (``reverse``) or its module name; a tensor that transformers
    converts (splits, stacks) rather than renames cannot be read or written piecewise, and is refused."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _conversions(model, reverse)
    if not renamings and not converters:
        return {name: name for name in names}
    state = None if reverse else model.state_dict()
    out = {}
    for name in names:
        out[name], converted = rename_source_key(name, renamings, converters, model.base_model_prefix, state,
                                                 reverse=reverse)
        if converted is not None:
            raise UserError(f"cannot offload {type(model).__name__}: its checkpoint tensor {name!r} is converted "
                            f"on loading, not just renamed; use --offload none")
    return out


def module_sources(model: nn.Module, sources: dict[str, Source]) -> dict[str, Source]:
    """A checkpoint's sources under the model's module names (:func:`_renamed`)."""
    return {new: sources[old] for old, new in _renamed(model, list(sources), reverse=False).items()}


def host_sources(sources: dict[str, tuple[str, str]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The same tensors read into host memory (``cpu`` mode), in the run dtype."""
    return {name: t.to(dtype) if t.is_floating_point() else t
            for name, t in zip(sources, _read(list(sources.values())))}


# --- saving block by block -----------------------------------------------------------------------
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def _header(entries: list[tuple[str, torch.Tensor]]) -> bytes:
    """A safetensors header for (name, placeholder) entries, in order: 8-byte length, JSON padded to 8."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in entries:
        end = offset + t.numel() * t.element_size()
        meta[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def save_sharded(offloader: Offloader, directory: Path, max_shard_bytes: int) -> None:
    """The model's weights as safetensors shards of at most ``max_shard_bytes`` (a unit larger than
    that gets a shard of its own) and, with more than one shard, the index file transformers reads.

    The shards are planned from the placeholders' shapes, so each file's header is written first and
    its tensors stream in unit by unit: the save holds one unit in memory, whatever the shard size.
    A tensor used in several places (tied) is written once, under its first name; names are the checkpoint's
    (:func:`_renamed`), as ``save_pretrained`` writes them."""
    model = offloader.model
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    written: set[int] = set()
    shards: list[list[tuple[Unit, list]]] = [[]]
    size = total = 0
    for unit in offloader.units_in_order():
        todo = []  # (name, module, attribute, is parameter, placeholder)
        for k, name, module, attr, is_param, t in unit.slots():
            if id(unit.roots[k]) in names and id(t) not in written:
                written.add(id(t))
                todo.append((_full_name(names[id(unit.roots[k])], name), module, attr, is_param, t))
        nbytes = sum(t.numel() * t.element_size() for *_, t in todo)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((unit, todo))
        size += nbytes
        total += nbytes
    saved = _renamed(model, [name for shard in shards for _, todo in shard for name, *_ in todo], reverse=True)
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    with bar(desc="saving", total=sum(len(shard) for shard in shards), unit="unit") as shown:
        for file, shard in zip(files, shards):
            with open(directory / file, "wb") as f:
                f.write(_header([(saved[name], t) for _, todo in shard for name, *_, t in todo]))
                for unit, todo in shard:
                    with offloader.hold(unit.roots[:1]):
                        for name, module, attr, is_param, _ in todo:
                            value = (module._parameters if is_param else module._buffers)[attr]
                            f.write(memoryview(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                                               .numpy()))
                            weight_map[saved[name]] = file
                    shown.update()
    if len(files) > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
