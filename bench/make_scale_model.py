"""A LLaMA-architecture model of >= 1 B parameters with seeded random weights, for scale tests and
benchmarks: quality meaningless, memory real. Written shard by shard (safetensors + index), one tensor
in memory at a time, so making it needs no more memory than its largest tensor.

    python3 bench/make_scale_model.py --out /tmp/scale-1b            # ~1.2 B parameters, bf16, ~2.3 GB
    python3 bench/make_scale_model.py --out DIR --hidden 64 --layers 2 --intermediate 128   # a small one

The tokenizer is SmolLM2's (packaged, offline) unless ``--tokenizer`` names another directory or
alias, and the vocabulary is the tokenizer's, so calibration and perplexity run on real text. Every
tensor is drawn from its own generator, seeded by (seed, its index in the state dict): the same
arguments write the same bytes on every machine. Never commit the output.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

INIT_STD = 0.02  # LLaMA's initializer_range


def scale_config(vocab_size: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5)


def tensor_shapes(config) -> dict[str, torch.Size]:
    """Name -> shape of every tensor of the model's state dict, from a model on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: t.shape for name, t in model.state_dict().items()}


def seeded_tensor(name: str, shape: torch.Size, index: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Norm weights 1, everything else N(0, INIT_STD), from a generator of its own."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return (torch.randn(shape, generator=gen) * INIT_STD).to(dtype)


def write_scale_model(out: Path, tokenizer_dir: str | Path, hidden: int = 2048, layers: int = 22,
                      intermediate: int = 5632, heads: int = 32, kv_heads: int = 4, seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 1 << 30) -> int:
    """Write the model to ``out`` (config, tokenizer, sharded safetensors + index); returns its
    number of parameters."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = scale_config(len(tokenizer), hidden, layers, intermediate, heads, kv_heads)
    config.dtype = dtype
    shapes = tensor_shapes(config)
    out.mkdir(parents=True, exist_ok=False)
    written: list[tuple[Path, list[str]]] = []  # provisional shard files: the count is known at the end
    current: dict[str, torch.Tensor] = {}

    def flush() -> None:
        path = out / f".shard-{len(written):05d}.safetensors"
        save_file(current, path, metadata={"format": "pt"})
        written.append((path, list(current)))
        current.clear()  # the tensors leave memory as soon as they are on disk

    for index, (name, shape) in enumerate(shapes.items()):
        tensor = seeded_tensor(name, shape, index, seed, dtype)
        if current and sum(t.nbytes for t in current.values()) + tensor.nbytes > max_shard_bytes:
            flush()
        current[name] = tensor
    flush()
    weight_map = {}
    for i, (path, keys) in enumerate(written):
        file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / file)
        weight_map.update(dict.fromkeys(keys, file))
    total = sum(torch.Size(s).numel() for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * dtype.itemsize}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="new directory (must not exist)")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="alias or directory whose tokenizer to use")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--max-shard-mb", type=int, default=1024)
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} already exists: choose another --out")
    from compress_eval.models.registry import local_path_or_id, resolve

    tokenizer_dir = local_path_or_id(resolve(args.tokenizer))
    total = write_scale_model(args.out, tokenizer_dir, args.hidden, args.layers, args.intermediate, args.heads,
                              args.kv_heads, args.seed, getattr(torch, args.dtype), args.max_shard_mb << 20)
    print(f"wrote {args.out}: {total / 1e9:.3f} B parameters ({args.dtype})")


if __name__ == "__main__":
    main()
