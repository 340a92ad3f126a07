"""The loading gate: a local model directory is trusted only when it is whole.

transformers half-accepts broken directories: a config with fewer layers' weights than it names is
loaded with the rest randomly initialised (a perplexity that looks right and is not), a directory
without tokenizer files fails deep in sentencepiece. Every path that opens a directory (``compress``,
``ppl``, ``eval``, ``export``, ``push``, the lm-eval model types) goes through :func:`check` first, which
reads the config, the safetensors headers (never the tensors), the manifest and the tokenizer, and
builds the model on the meta device to know which tensor names it expects. Anything wrong is one
:class:`UserError` line naming the file, the tensors and the likely cause.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from compress_eval.errors import UserError
from compress_eval.manifest import Manifest
from compress_eval.models.adapters import is_multimodal
from compress_eval.results.store import MANIFEST, read_manifest

# Weight files that are pickles: loading one can run arbitrary code, so they need --allow-pickle.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Files from which transformers builds a tokenizer (any one of them may be enough).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")
# bitsandbytes stores each quantized weight's state beside it under these names.
QUANT_STATE = re.compile(r"\.weight\.(absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+)$"
                         r"|\.(SCB|weight_format)$")
# A block's index in a tensor name (model.layers.3.mlp..., transformer.h.3.attn...).
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
SHOWN = 3


@dataclass
class Checked:
    """What the gate read and a loader needs anyway: the manifest and the tokenizer."""

    manifest: Manifest | None
    tokenizer: object


def first_line(exc: BaseException) -> str:
    """An exception's message on one line: its first line, and the next where the first only opens it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def check(directory: str | Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> Checked:
    """Refuse, in one line, a model directory that is not whole; return what was read on the way."""
    directory = Path(directory)
    config = read_config(directory, trust_remote_code)
    manifest = read_manifest(directory)
    names = weight_names(directory, allow_pickle)
    model = meta_model(directory, config, trust_remote_code)
    if manifest is not None:
        check_manifest(directory, manifest, config, model)
    check_weight_names(directory, names, model, config, manifest)
    return Checked(manifest, load_tokenizer(directory, trust_remote_code))


def read_config(directory: Path, trust_remote_code: bool = False):
    """The directory's config, its family known to transformers."""
    from transformers import AutoConfig, __version__ as version

    path = directory / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{directory} has no config.json: give a model or checkpoint directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({first_line(exc)}): save the model again") from None
    if not isinstance(data, dict) or not data.get("model_type"):
        raise UserError(f"{path} has no model_type, so transformers cannot tell the model's family: add "
                        f"\"model_type\" (e.g. \"llama\") or save the model again with save_pretrained")
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{directory} needs its own Python code to load: pass --trust-remote-code if you "
                            f"trust its authors") from None
        raise UserError(f"{path}: model_type {data['model_type']!r} is not a family transformers {version} "
                        f"knows: fix model_type, or upgrade transformers") from None
    except Exception as exc:  # transformers raises what its config classes raise on bad values
        raise UserError(f"{path} cannot be read by transformers: {first_line(exc)}; fix the file or save the "
                        f"model again") from None


@dataclass(frozen=True)
class Stored:
    """A stored tensor as its file's header describes it."""

    file: str
    shape: tuple[int, ...]


def weight_names(directory: Path, allow_pickle: bool = False) -> dict[str, Stored]:
    """Every stored tensor by name, from the safetensors headers (the tensors are not read); pickles
    only with ``allow_pickle`` (read with ``weights_only``, onto the meta device). A shard index must
    name shards that exist, and their headers must agree with it."""
    index = next((directory / name for name in WEIGHT_INDEXES[:1 + allow_pickle] if (directory / name).is_file()),
                 None)
    files = sorted(directory.glob("*.safetensors"))
    if index is not None:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [directory / f for f in dict.fromkeys(weight_map.values())]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{index} is not a weight index ({first_line(exc)}): save the model again") from None
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UserError(f"{index} names shards that are not in {directory}: {listing(absent)}; download or "
                            f"save the model again")
    stored = read_headers(directory, files) if files else {}
    if index is not None and set(weight_map) != set(stored):
        odd = sorted(set(weight_map) ^ set(stored))
        raise UserError(f"{index} and its shards disagree on {len(odd)} tensors: {listing(odd)}; download or "
                        f"save the model again")
    if stored:
        return stored
    pickles = sorted(p for pattern in PICKLE_WEIGHTS for p in directory.glob(pattern))
    if pickles and not allow_pickle:
        raise UserError(f"{directory} holds only pickle weights ({pickles[0].name}), which can run code when "
                        f"loaded: convert them to safetensors, or pass --allow-pickle if you trust the files")
    for path in pickles:
        try:
            state = torch.load(path, map_location="meta", weights_only=True)
        except Exception as exc:  # torch raises what unpickling raises
            raise UserError(f"cannot read the weights of {directory}: {path.name}: {first_line(exc)}; save or "
                            f"download the model again") from None
        stored.update({name: Stored(path.name, tuple(t.shape)) for name, t in state.items()})
    if not stored:
        raise UserError(f"{directory} holds no weights (model.safetensors): save the model with save_pretrained "
                        f"into it, or give the directory that has them")
    return stored


def read_headers(directory: Path, files: list[Path]) -> dict[str, Stored]:
    from safetensors import SafetensorError, safe_open

    stored: dict[str, Stored] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                stored.update({name: Stored(path.name, tuple(f.get_slice(name).get_shape())) for name in f.keys()})
        except (SafetensorError, OSError) as exc:
            raise UserError(f"cannot read the weights of {directory}: {path.name}: {first_line(exc)} (a truncated "
                            f"or corrupt .safetensors file); save or download the model again") from None
    return stored


def model_class(config):
    """AutoModelForImageTextToText for LLaVA-style models, else AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_multimodal(getattr(config, "model_type", None)) else AutoModelForCausalLM


def meta_model(directory: Path, config, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model the config describes, without memory (meta tensors): the names it expects."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return model_class(config).from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a config transformers reads but cannot build (bad sizes, no causal LM)
        raise UserError(f"{directory / 'config.json'} describes no model transformers can build: "
                        f"{first_line(exc)}; fix the config or save the model again") from None
    finally:
        hf_logging.set_verbosity(level)


def check_manifest(directory: Path, manifest: Manifest, config, model: torch.nn.Module) -> None:
    """The manifest agrees with the config: the modules it names exist, its depth and quantization are
    the config's."""
    from compress_eval.models.adapters import get_adapter

    where = directory / MANIFEST
    for field, paths in (("tie_map", [*manifest.tie_map, *manifest.tie_map.values()]),
                         ("skipped", manifest.skipped)):
        unknown = [p for p in paths if not has_module(model, p)]
        if unknown:
            raise UserError(f"{where}: its {field} names modules the model (config.json) does not have: "
                            f"{listing(unknown)}; the manifest is another model's or was edited: re-run the "
                            f"compression that made it")
    blocks = get_adapter(model).num_blocks
    if manifest.blocks_after is not None and manifest.blocks_after != blocks:
        raise UserError(f"{where} says the model has {manifest.blocks_after} blocks and config.json {blocks}: "
                        f"one of them was edited or replaced; re-run the compression that made it")
    quantized = getattr(config, "quantization_config", None) is not None
    if manifest.quantized != quantized:
        said = "is" if manifest.quantized else "is not"
        raise UserError(f"{where} says the model {said} quantized and config.json disagrees: one of them was "
                        f"edited or replaced; re-run the compression that made it")


def absent_modules(manifest: Manifest) -> list[str]:
    """Module paths whose weights a checkpoint leaves out on purpose: tie-map copies, removed sublayers."""
    return [*manifest.tie_map, *manifest.skipped]


def has_module(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def check_weight_names(directory: Path, stored: dict[str, Stored], model: torch.nn.Module, config,
                       manifest: Manifest | None) -> None:
    """Every tensor the model expects is stored with the config's shape, and nothing else is, once the
    names are mapped as transformers maps them on load. Not missing: a tied head, a tie map's copies,
    removed sublayers; not unexpected: bitsandbytes' quantization state (whose packed shapes are its own)."""
    expected = model.state_dict()
    keys = model_keys(model, stored, expected)
    quantized = getattr(config, "quantization_config", None) is not None
    found = {key for key in keys.values() if not (quantized and QUANT_STATE.search(key))}
    absent = tuple(f"{path}." for path in (absent_modules(manifest) if manifest else []))
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    missing = sorted(k for k in expected.keys() - found
                     if not k.startswith(absent) and not (k in tied and tied[k] in found)
                     and not ignored(k, model._keys_to_ignore_on_load_missing))
    unexpected = sorted(k for k in found - expected.keys() if not ignored(k, model._keys_to_ignore_on_load_unexpected)
                        and not re.search(r"(rotary_emb\.inv_freq|(^|\.)position_ids)$", k))
    files = ", ".join(sorted({s.file for s in stored.values()}))
    if missing:
        raise UserError(f"{directory}: the weights ({files}) lack {len(missing)} tensors the config expects: "
                        f"{listing(missing)}; {cause(missing, found, set(expected), 'missing')}")
    if unexpected:
        raise UserError(f"{directory}: the weights ({files}) hold {len(unexpected)} tensors the config does not "
                        f"name: {listing(unexpected)}; {cause(unexpected, found, set(expected), 'unexpected')}")
    resized = [] if quantized else sorted(
        f"{name} {list(s.shape)} (config: {list(expected[keys[name]].shape)})" for name, s in stored.items()
        if keys[name] in expected and tuple(expected[keys[name]].shape) != s.shape)
    if resized:
        raise UserError(f"{directory}: {len(resized)} stored tensors have other shapes than config.json gives: "
                        f"{listing(resized)}; the config was edited or is another model's: save the model again")


def model_keys(model: torch.nn.Module, names, expected) -> dict[str, str]:
    """The model's name for each checkpoint tensor: transformers' own renamings (older checkpoint layouts,
    a missing or extra base-model prefix) applied, as on load."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    known = dict.fromkeys(expected, True)
    return {name: rename_source_key(name, renamings, converters, model.base_model_prefix, known)[0] for name in names}


def ignored(key: str, patterns) -> bool:
    return any(re.search(p, key) for p in patterns or ())


def cause(names: list[str], stored: set[str], expected: set[str], kind: str) -> str:
    """The likely reason for ``names`` (missing or unexpected tensors): a config that names another
    depth than the weights hold, or else weights that belong to another model."""
    if all(BLOCK_INDEX.search(n) for n in names):
        held, named = blocks_in(stored), blocks_in(expected)
        if kind == "missing" and held < named:
            return (f"config.json names {named} blocks but the weights hold {held}: set the number of layers "
                    f"to {held}, or save the model again")
        if kind == "unexpected" and named < held:
            return (f"the weights hold {held} blocks but config.json names {named}: set the number of layers "
                    f"to {held}, or save the model again")
    return "the weights are incomplete or another model's: save or download the model again"


def blocks_in(names: set[str]) -> int:
    return len({m.group(1) for n in names if (m := BLOCK_INDEX.search(n))})


def listing(names: list[str]) -> str:
    """The first few names and how many more."""
    more = f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def load_tokenizer(directory: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved in a directory, or one line naming what is wrong with its files."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...): save the "
                        f"tokenizer beside the model (tokenizer.save_pretrained(DIR))")
    try:
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers and tokenizers raise many types on bad files
        present = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
        raise UserError(f"cannot load the tokenizer of {directory} ({', '.join(present)}): {first_line(exc)}; "
                        f"save the tokenizer again") from None
