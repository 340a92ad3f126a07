"""The model a plan is made for, from its config alone (a directory, a config.json, a shipped example or one
of our model names; never its weights): the shapes and parameter counts the memory model reads."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from compress_eval.errors import UserError

EXAMPLE_CONFIGS = Path(__file__).resolve().parent / "model_configs"


def example_names() -> list[str]:
    """Configs shipped with the package (``llama3-8b``, ``llama3-70b``): planning needs no download."""
    return sorted(p.stem for p in EXAMPLE_CONFIGS.glob("*.json"))


def load_config(model: str, trust_remote_code: bool = False):
    """The transformers config of MODEL: a directory with config.json, a config.json path, a shipped
    example config, or one of our model names (never its weights)."""
    from transformers import AutoConfig

    from compress_eval.models.registry import ALIASES, PACKAGED, packaged_cache_path, packaged_gguf, resolve

    path = Path(model).expanduser()
    if path.is_file() or model in example_names():
        file = path if path.is_file() else EXAMPLE_CONFIGS / f"{model}.json"
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{file} is not a JSON config: give a model's config.json") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise UserError(f"{file} has no model_type: give a transformers config.json")
        return _config_for(data, file)
    if model.endswith(".json"):
        raise UserError(f"config file {model} not found: give the path of a model's config.json")
    try:
        source = resolve(model)  # directories, packaged models, aliases, Hub ids
    except UserError as exc:
        if not str(exc).startswith("unknown model"):
            raise
        names = example_names() + list(ALIASES) + list(PACKAGED)
        close = difflib.get_close_matches(model, list(dict.fromkeys(names)), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"unknown model {model!r}: {hint}give a model directory, a config.json, an alias from "
                        f"`compress-eval models` or a shipped config ({', '.join(example_names())})") from None
    where, kwargs = source.location, {}
    if source.kind == "packaged" and not (Path(source.location) / "config.json").exists():
        gguf = packaged_gguf(model)  # the package's GGUF, or its parts assembled once
        where, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif source.kind == "packaged":
        where = str(packaged_cache_path(model))
    try:
        return AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{model!r} needs its own Python code: pass --trust-remote-code if you trust "
                            f"its authors") from None
        raise UserError(f"cannot read the config of {model!r}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise UserError(f"cannot read the config of {model!r} ({where}): {str(exc).splitlines()[0]}; give a "
                        f"local directory or a config.json (or check the network / HF cache)") from None


def _config_for(data: dict, file: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{file}: not a config transformers knows ({str(exc).splitlines()[0]})") from None


def config_dtype_bytes(config) -> int | None:
    """Bytes per weight in the checkpoint files, from the config's dtype (None when it names none)."""
    import torch

    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name.itemsize
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(name).removeprefix("torch."))


@dataclass(frozen=True)
class Architecture:
    """What memory depends on in a model, counted on the meta device (``parameters`` counts a tied
    tensor once, as a checkpoint holds it)."""

    model_type: str
    parameters: int
    buffers: int  # elements of buffers (rotary tables): they stay on the device whatever the offload
    blocks: tuple[int, ...]  # parameters per decoder block
    embedding: int  # the input embedding unit (with the head when tied)
    head: int  # a separate LM head (0 when tied)
    other: int  # everything else outside the blocks (final norm, a vision tower)
    linears: int  # parameters of one block's linears (the largest block)
    largest_linear: int
    ff: int  # parameters of one block's FF sublayer
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eager_attention: bool  # scores materialized (batch x heads x T x T)
    file_bytes: int | None  # bytes per weight in the checkpoint files

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def block(self) -> int:
        return max(self.blocks)

    def largest_unit(self) -> int:
        """Parameters of the largest unit an offloaded run puts on the device: a block or a part."""
        return max(self.block, self.embedding, self.head, self.other)


def architecture(config, trust_remote_code: bool = False) -> Architecture:
    """Sizes of the model a config describes, from an instance on the meta device (seconds, even 70B)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from compress_eval.models.adapters import get_adapter, is_multimodal

    auto = AutoModelForImageTextToText if is_multimodal(getattr(config, "model_type", None)) else AutoModelForCausalLM
    try:
        with init_empty_weights():
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"cannot build a {getattr(config, 'model_type', '?')} model from its config: "
                        f"{str(exc).splitlines()[0]}") from None
    model.tie_weights()  # init_empty_weights leaves a tied head untied: it would count twice
    adapter = get_adapter(model)  # unsupported architectures fail here, with the supported list

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    blocks = adapter.blocks
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    head_params = 0 if head is None or tied else count(head)
    embed_params = count(embed)
    outside = total - sum(p.numel() for p in model.parameters() if id(p) in block_ids)
    block0 = blocks[max(range(len(blocks)), key=lambda i: count(blocks[i]))]
    linears = [adapter.weight_out_in(adapter.linear(block0, r)).shape for r in adapter.linear_roles()]
    fc = "up" if adapter.is_gated_mlp else "fc1"
    text = adapter.text_config
    heads = text.num_attention_heads
    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    return Architecture(
        model_type=text.model_type,
        parameters=total,
        buffers=sum(b.numel() for b in model.buffers()),
        blocks=tuple(count(b) for b in blocks),
        embedding=embed_params,
        head=head_params,
        other=max(0, outside - embed_params - head_params),
        linears=sum(o * i for o, i in linears),
        largest_linear=max(o * i for o, i in linears),
        ff=count(adapter.mlp(block0)),
        hidden=embed.weight.shape[1],
        intermediate=adapter.weight_out_in(adapter.linear(block0, fc)).shape[0],
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or embed.weight.shape[1] // heads,
        vocab=embed.weight.shape[0],
        eager_attention=attn == "eager",
        file_bytes=config_dtype_bytes(config),
    )
