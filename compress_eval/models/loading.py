"""Loading models: names to modules on a device, our checkpoints with their ties, and the quirks of
bitsandbytes on load. The one module that calls ``from_pretrained``; the CLI, evaluation, the
pipeline and the quantization stage all load through it.

Weights load from safetensors only unless the caller allows pickles; a model's own Python code runs
only with ``trust_remote_code``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import torch

from compress_eval import distributed
from compress_eval.errors import UserError
from compress_eval.models import gate
from compress_eval.manifest import Manifest
from compress_eval.models.adapters import is_multimodal
from compress_eval.models.registry import local_path_or_id, resolve
from compress_eval.results.store import read_manifest

log = logging.getLogger(__name__)
# --dtype names; the 4-bit compute dtypes are the first three.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    """The GPU if there is one (under a data-parallel launcher, this process's own), else the CPU."""
    if distributed.world_size() > 1:
        return str(distributed.device())
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """The device to run on: the one named, checked to exist here, or the default."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device (or torch is a CPU build); "
                        f"use --device cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices here")
    return device


def default_dtype(device: str) -> torch.dtype:
    """fp32 on CPU (fp16/bf16 matmuls there are slow or unsupported), bf16 on CUDA."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def parse_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def auto_model_class(where: str, trust_remote_code: bool = False):
    """AutoModelForCausalLM, or AutoModelForImageTextToText for LLaVA-style models."""
    from transformers import AutoConfig

    return gate.model_class(AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code))


def load_model(name: str, device: str | None = None, dtype: str | torch.dtype | None = None,
               allow_pickle: bool = False, trust_remote_code: bool = False, offload: str = "none",
               offload_dir: str | None = None):
    """Load (model, tokenizer, source) for a name; the model is in eval mode on ``device``.

    Weights load from safetensors only unless ``allow_pickle``; a model's own Python code runs only
    with ``trust_remote_code`` (both off by default, as the flags of the same names). With
    ``offload`` cpu or disk the model is built on the meta device and its weights stay on the host or
    in their files, a unit at a time on the device (``models.offload``)."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    source = resolve(name)
    device = resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    where = local_path_or_id(source)
    trust = {"trust_remote_code": trust_remote_code}
    tokenizer = manifest = None
    if source.kind != "hub":  # a local directory or a packaged model's cache: loaded only when whole
        checked = gate.check(where, allow_pickle, trust_remote_code)
        tokenizer = checked.tokenizer
        manifest = checked.manifest if source.kind == "local" else None
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(where, **trust)
        if offload in ("cpu", "disk"):
            model = load_offloaded(where, manifest, offload, device, torch_dtype, offload_dir, trust_remote_code)
            return model, tokenizer, source
        if manifest is not None:
            model, _ = load_checkpoint(where, manifest, dtype=torch_dtype, device=device)
        else:
            model = from_pretrained_tied(auto_model_class(where, trust_remote_code), where, [], dtype=torch_dtype,
                                         use_safetensors=None if allow_pickle else True, **trust)
    except SafetensorError as exc:
        raise UserError(f"cannot read the weights of {where}: {str(exc).splitlines()[0]} (a truncated or "
                        f"corrupt .safetensors file); save or download the model again") from None
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise UserError(f"{name!r} needs its own Python code to load: pass --trust-remote-code if you "
                        f"trust its authors") from None
    except OSError as exc:
        hint = "" if allow_pickle else " (weights are read from safetensors only: --allow-pickle reads pickles)"
        if source.kind == "hub":
            raise UserError(
                f"cannot load {name!r} from the Hugging Face Hub ({source.location}): "
                f"{str(exc).splitlines()[0]}; check the network/HF_TOKEN or give a local directory{hint}"
            ) from None
        raise UserError(f"cannot load model from {where}: {str(exc).splitlines()[0]}{hint}") from None
    model.to(device).eval()
    return model, tokenizer, source


def load_processor(model, name: str, trust_remote_code: bool = False):
    """The processor (image processor + tokenizer) of a vision-language model, saved with its
    checkpoint so that the checkpoint takes images; None for a text model or a source without one
    (said in the log: such a checkpoint is text-only)."""
    if not is_multimodal(getattr(model.config, "model_type", None)):
        return None
    from transformers import AutoProcessor, ProcessorMixin

    where = local_path_or_id(resolve(name))
    try:
        processor = AutoProcessor.from_pretrained(where, trust_remote_code=trust_remote_code)
    except (OSError, ImportError, AttributeError) as exc:  # no preprocessor_config.json; a missing torchvision
        log.warning("%s has no loadable processor (%s): its checkpoint keeps the tokenizer only and takes no "
                    "images", name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return processor if isinstance(processor, ProcessorMixin) else None


def model_directory(where: str) -> Path:
    """The local directory of a model: itself, or the Hub snapshot of its config and safetensors."""
    if Path(where).is_dir():
        return Path(where)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(where, allow_patterns=["*.json", "*.safetensors"]))


def load_offloaded(where: str, manifest: Manifest | None, mode: str, device: str, dtype: torch.dtype,
                   workdir: str | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """A model skeleton on the meta device whose weights stay on the host (``cpu``) or in their
    safetensors files (``disk``), loaded unit by unit while they run (:class:`Offloader`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    from compress_eval.models.adapters import get_adapter
    from compress_eval.models.offload import Offloader, checkpoint_sources, host_sources, module_sources

    if manifest is not None and manifest.quantized:
        raise UserError(f"{where} is quantized (bitsandbytes): it cannot be offloaded; use --offload none")
    directory = model_directory(where)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = auto_model_class(str(directory), trust_remote_code).from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config ties only real weights; the placeholders must be tied as the model is
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    if manifest is not None:
        restore_structure(model, manifest.tie_map, manifest.skipped)
    sources = module_sources(model, checkpoint_sources(directory))
    if mode == "cpu":
        sources = host_sources(sources, dtype)
    Offloader(model, get_adapter(model).blocks, mode, device, dtype, sources, workdir)
    return model.eval()


@contextlib.contextmanager
def copies_detached(model: torch.nn.Module, tie_map: dict[str, str]):
    """Within the block, each tie-map copy is an empty module, so a save stores a tied module once
    (safetensors refuses shared storage, and a quantized model's save ignores a given state dict);
    the sharing is restored on exit, as ``retie`` restores it on load."""
    for dst in tie_map:
        model.set_submodule(dst, torch.nn.Module())
    try:
        yield model
    finally:
        retie(model, tie_map)


def retie(model: torch.nn.Module, tie_map: dict[str, str]) -> None:
    """Make every module path in ``tie_map`` the very module it maps to (one tensor in memory)."""
    for dst, src in tie_map.items():
        model.set_submodule(dst, model.get_submodule(src))


def shared_modules(model: torch.nn.Module) -> dict[str, str]:
    """The tie map a model holds: {path: the first path of the same module} for every module with weights
    reachable under more than one path (their children not repeated). Read from the model, as the
    removed sublayers are, so a tie made by an earlier run (a merged checkpoint healed or compressed
    again) is still stored once."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if any(path.startswith(f"{dst}.") for dst in ties) or next(module.parameters(), None) is None:
            continue
        if id(module) in first:
            ties[path] = first[id(module)]
        else:
            first[id(module)] = path
    return ties


def untie(model: torch.nn.Module, tie_map: dict[str, str]) -> None:
    """The inverse of :func:`retie`: every tie-map copy becomes its own module (a deep copy)."""
    for dst, src in tie_map.items():
        model.set_submodule(dst, copy.deepcopy(model.get_submodule(src)))


def restore_structure(model: torch.nn.Module, tie_map: dict[str, str], skipped: list[str]) -> None:
    """Put back on a model loaded from a checkpoint what its weights leave out on purpose: its removed
    sublayers (empty modules) and its ties."""
    if skipped:
        from compress_eval.models.adapters import get_adapter

        get_adapter(model).skip_paths(skipped)
    retie(model, tie_map)


def load_checkpoint(directory: str | Path, manifest: Manifest | None = None, dtype: torch.dtype | None = None,
                    device: str | None = None) -> tuple[torch.nn.Module, Manifest]:
    """(model, manifest) of one of our checkpoint directories, with its tie map re-applied. A
    bitsandbytes checkpoint is loaded straight onto ``device`` (its weights cannot be cast)."""
    manifest = manifest or read_manifest(directory)
    if manifest is None:
        raise UserError(f"{directory} is not a compress-eval checkpoint (no manifest)")
    placement = {}
    if manifest.quantized:
        quiet_int8_cast_warning()
        placement = {"device_map": {"": device}} if device else {}
    model = from_pretrained_tied(auto_model_class(str(directory)), directory, gate.absent_modules(manifest),
                                 dtype=dtype, **placement)
    restore_structure(model, manifest.tie_map, manifest.skipped)
    if manifest.quantized:
        keep_4bit_scales_on_save(model)  # a re-save after inference keeps the scales it was loaded with
    return model, manifest


def from_pretrained_tied(cls, directory, absent: list[str], **kwargs):
    """``cls.from_pretrained``, refusing a model that would run with initialised weights: any tensor
    missing from the checkpoint is an error (the gate refuses a local directory earlier; this catches a
    Hub download). Modules whose weights are absent on purpose (a tie map's copies, stored once;
    removed sublayers) are not missing, and transformers' own "MISSING" report is silenced."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(directory, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    prefixes = tuple(f"{path}." for path in absent)
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(prefixes))
    if missing:
        raise UserError(f"the weights of {directory} lack {len(missing)} tensors the model needs: "
                        f"{gate.listing(missing)}; they would be randomly initialised: download or save the model "
                        f"again")
    return model


def _first_of_int8_cast_warnings(record: logging.LogRecord) -> bool:
    """LLM.int8() logs on every matmul that fp32/bf16 inputs are cast to fp16; keep the first."""
    if "inputs will be cast" not in record.getMessage():
        return True
    seen = getattr(_first_of_int8_cast_warnings, "seen", False)
    _first_of_int8_cast_warnings.seen = True
    return not seen


def quiet_int8_cast_warning() -> None:
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if _first_of_int8_cast_warnings not in bnb_log.filters:
        bnb_log.addFilter(_first_of_int8_cast_warnings)


def _restore_4bit_scales(module, state_dict, prefix, local_metadata) -> None:
    """A state-dict post-hook for Linear4bit. On AVX512-BF16 CPUs, bitsandbytes 0.50 repacks a 4-bit
    weight at its first inference and unpacks it when saved, but leaves the block scales of a weight
    without double quantization in the packed (in_features/64, out_features) bf16 layout: with
    in_features > 64 the checkpoint, and the model itself from then on, scale the wrong blocks. Put
    them back in their flat float32 order, in the module and in the state dict (the values stay the
    bf16-rounded ones inference used)."""
    state = getattr(module.weight, "quant_state", None)
    if (state is None or state.nested or state.absmax.dim() != 2
            or getattr(state, "packing_format_for_cpu", False)):
        return
    state.absmax = state.absmax.T.reshape(-1).float()
    state_dict[prefix + "weight.absmax"] = state.absmax


def keep_4bit_scales_on_save(model: torch.nn.Module) -> None:
    """Hook ``_restore_4bit_scales`` onto every Linear4bit of ``model``, so saving it after inference
    on an AVX512-BF16 CPU writes (and keeps) the scales that inference used."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.register_state_dict_post_hook(_restore_4bit_scales)


