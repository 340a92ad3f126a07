"""lm-eval model type ``compressed``: any compress-eval checkpoint or model name inside lm-eval.

``HFLM`` does everything (batching, caching, request handling); only model creation changes, so a
depth-pruned, FF-tied or quantized checkpoint is rebuilt from its manifest by our own loader, and
our aliases (``smollm2-135m``) work as ``pretrained``. Importing this module registers the type;
``compress-eval lm-eval`` and ``compress-eval eval`` do so.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from compress_eval.models.loading import load_model
from compress_eval.models.registry import local_path_or_id, resolve

MODEL_TYPE = "compressed"
# Our task YAMLs (offline benchmarks, papers' perplexity); lm-eval finds them via --include_path.
TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"


def tasks_dir() -> str:
    """Our task directory, for lm-eval's include_path (it lives beside the package in a checkout)."""
    if not TASKS_DIR.is_dir():
        from compress_eval.errors import UserError

        raise UserError(f"task directory {TASKS_DIR} is missing: install compress-eval from a source checkout "
                        f"(pip install -e .) so tasks/ sits beside the package")
    return str(TASKS_DIR)


# HFLM options that build the model another way; ours is always the checkpoint as saved.
UNSUPPORTED = ("peft", "delta", "autogptq", "gptqmodel", "gguf_file", "parallelize", "tp_plan")
# What HFLM always hands to model creation, set or not (the rest would be from_pretrained kwargs).
HFLM_PLUMBING = ("revision", "trust_remote_code", "gpus", "max_memory_per_gpu", "max_cpu_memory",
                 "offload_folder", "quantization_config", "subfolder")


def sync_tied_embeddings(model) -> None:
    """Make ``tie_word_embeddings`` say what the loaded model really does.

    HFLM calls ``tie_weights()`` after creation; a config claiming ties that the weights do not have
    would overwrite the output head with the embeddings (and the reverse would untie nothing).
    """
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = tied


@register_model(MODEL_TYPE)
class CompressedLM(HFLM):
    """``--model compressed --model_args pretrained=DIR_OR_ALIAS[,dtype=...][,allow_pickle=True][,offload=disk]``
    (``offload``: a model larger than the device runs block by block, see ``models.offload``)."""

    def __init__(self, pretrained: str, tokenizer=None, allow_pickle: bool = False, offload: str = "none",
                 **kwargs) -> None:
        from transformers import AutoTokenizer

        if offload not in ("none", "cpu", "disk"):
            raise ValueError(f"offload={offload!r}: use none, cpu or disk")
        self.allow_pickle, self.offload = allow_pickle, offload
        location = local_path_or_id(resolve(pretrained)) if isinstance(pretrained, str) else pretrained
        # HFLM would otherwise look the tokenizer up by name (on the Hub for an alias).
        if tokenizer is None and isinstance(location, str):
            tokenizer = AutoTokenizer.from_pretrained(location,
                                                      trust_remote_code=kwargs.get("trust_remote_code", False))
        super().__init__(pretrained=location, tokenizer=tokenizer, **kwargs)

    def _create_model(self, pretrained: str, dtype="auto", trust_remote_code=False, **kwargs) -> None:
        chosen = [name for name in UNSUPPORTED if kwargs.get(name)]
        chosen += [name for name in kwargs if name not in UNSUPPORTED + HFLM_PLUMBING]
        if chosen:
            raise ValueError(f"model type {MODEL_TYPE!r} loads checkpoints as saved; model arg {chosen[0]!r} "
                             f"is not supported (use --model hf for it)")
        model, _, _ = load_model(pretrained, device=str(self.device), dtype=dtype, allow_pickle=self.allow_pickle,
                                 trust_remote_code=bool(trust_remote_code), offload=self.offload)
        sync_tied_embeddings(model)
        self._model = model
