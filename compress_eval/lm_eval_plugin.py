"""lm-eval model types ``compressed`` and ``compressed-multimodal``: any compress-eval checkpoint or model
name inside lm-eval, the second for image tasks on vision-language models (lm-eval's ``hf-multimodal``).

``HFLM`` does the request handling (batching, caching); model creation changes, so a depth-pruned,
FF-tied or quantized checkpoint is rebuilt from its manifest by our own loader, and our aliases
(``smollm2-135m``) work as ``pretrained``. Given ``method=`` or ``recipe=``, it compresses the model in
memory first (``pipeline.compress``), so a method is evaluated without a checkpoint on disk (``save_dir=``
keeps one). Log-likelihood requests that share a context run it once (``scoring.shared_prefix``;
``shared_prefix=False`` gives HFLM's path). Importing this module registers the type; ``compress-eval
lm-eval`` and ``compress-eval eval`` do so, and the ``lm_eval.models`` entry point names it for lm-eval
releases that read plugins.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.hf_vlms import HFMultimodalLM
from lm_eval.models.huggingface import HFLM

from compress_eval.config import CompressConfig, load_recipe, make_config
from compress_eval.errors import UserError
from compress_eval.manifest import Manifest
from compress_eval.models import checkpoint, gate
from compress_eval.models.adapters import is_multimodal
from compress_eval.models.loading import load_model
from compress_eval.models.registry import local_path_or_id, resolve
from compress_eval.progress import bar
from compress_eval.results.store import read_manifest
from compress_eval.scoring import shared_prefix as sp

MODEL_TYPE = "compressed"
MULTIMODAL_TYPE = "compressed-multimodal"
# Images per question: MMMU's reference evaluation of LLaVA-1.5 gives the model the first image only (lm-eval's
# MMMU README recommends setting max_images; its default, 999, passes every image).
MAX_IMAGES = 1
# Our task YAMLs (offline benchmarks, papers' perplexity), which lm-eval finds via --include_path: in an
# installed wheel the package carries them as compress_eval/_tasks (setup.py); in a checkout, installed
# editable or on PYTHONPATH, they are the repository's tasks/ beside the package.
TASKS_DIRS = (Path(__file__).resolve().parent / "_tasks", Path(__file__).resolve().parent.parent / "tasks")
# Requests per forward of shared-prefix scoring under batch_size=auto: HFLM's probe runs full-length
# batches (minutes on a CPU), and shared contexts and continuations are short.
AUTO_BATCH = 16


def tasks_dir() -> str:
    """Our task directory, for lm-eval's include_path."""
    for folder in TASKS_DIRS:
        if (folder / "ce_loaders.py").is_file():
            return str(folder)
    raise UserError(f"compress-eval's lm-eval tasks are missing (looked in {', '.join(map(str, TASKS_DIRS))}): "
                    f"reinstall compress-eval (pip install --force-reinstall compress-eval)")


# HFLM options that build the model another way; ours is always the checkpoint as saved.
UNSUPPORTED = ("peft", "delta", "autogptq", "gptqmodel", "gguf_file", "parallelize", "tp_plan")
# What HFLM always hands to model creation, set or not (the rest would be from_pretrained kwargs).
HFLM_PLUMBING = ("revision", "trust_remote_code", "gpus", "max_memory_per_gpu", "max_cpu_memory",
                 "offload_folder", "quantization_config", "subfolder")


def own_args(cls) -> frozenset[str]:
    """The model args an lm-eval model class takes itself (through its HFLM ancestors); with method= or
    recipe=, every other name is a method option."""
    return frozenset(name for klass in cls.__mro__ if issubclass(klass, HFLM) and "__init__" in vars(klass)
                     for name in inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}


HFLM_ARGS = own_args(HFLM)
# CompressConfig fields that only compression reads. The model is ``pretrained``; dtype and
# trust_remote_code are HFLM's too (both read them); device and offload place the evaluated model, so
# the evaluation's own values compress it; stages come from a recipe.
COMPRESS_ARGS = tuple(name for name in CompressConfig.model_fields if name not in (
    "model", "options", "recovery", "stages", "device", "offload", "allow_pickle", "dtype", "trust_remote_code"))


def sync_tied_embeddings(model) -> None:
    """Make ``tie_word_embeddings`` say what the loaded model really does.

    HFLM calls ``tie_weights()`` after creation; a config claiming ties that the weights do not have
    would overwrite the output head with the embeddings (and the reverse would untie nothing).
    """
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = tied


def compression_config(pretrained: str | None, recipe: str | None, allow_pickle: bool,
                       args: dict, lm_args: frozenset[str] = HFLM_ARGS) -> tuple[CompressConfig | None, dict]:
    """The compression that model args ask for (None: evaluate ``pretrained`` as it is) and the args
    left for HFLM. As with ``compress-eval compress``, the args override the recipe, and the names
    that are neither HFLM's nor CompressConfig's are the method's options."""
    ours = {k: v for k, v in args.items() if k in COMPRESS_ARGS}
    rest = {k: v for k, v in args.items() if k not in COMPRESS_ARGS}
    if recipe is None and "method" not in ours:
        if ours:
            raise UserError(f"model arg {next(iter(ours))}= is a compression setting: add method=NAME "
                            f"(see `compress-eval methods`) or recipe=FILE to compress on load")
        return None, rest
    options = {k: rest.pop(k) for k in list(rest) if k not in lm_args}
    shared = {k: rest[k] for k in ("dtype", "trust_remote_code") if k in rest}
    values = {**ours, **shared, "model": pretrained, "allow_pickle": allow_pickle or None, "options": options}
    return (load_recipe(recipe, **values) if recipe else make_config(**values)), rest


@register_model(MODEL_TYPE)
class CompressedLM(HFLM):
    """``--model compressed --model_args pretrained=DIR_OR_ALIAS[,dtype=...][,allow_pickle=True][,offload=disk]``
    (``offload``: a model larger than the device runs block by block, see ``models.offload``).

    Compress on load: ``method=NAME`` with any CompressConfig field (``sparsity=0.25``, ``calib_samples=8``,
    ``quantize=nf4``, ...) and method options by name (``profile=cpu``), or ``recipe=FILE`` (args override
    it); ``save_dir=DIR`` also writes the checkpoint; calibration data from ``data_dir=`` or
    $COMPRESS_EVAL_DATA_DIR. The manifest's recipe and counts go into lm-eval's results (get_model_info).

    Shared-prefix scoring (``shared_prefix=True``, the default): log-likelihood requests with one context
    run it once and their continuations from its cache (``scoring.shared_prefix``), with HFLM's numbers.
    Under torchrun lm-eval gives each process whole documents, so the choices of one question stay
    together and keep sharing (identical contexts of documents on different processes run on each).
    """

    def __init__(self, pretrained: str | None = None, tokenizer=None, allow_pickle: bool = False,
                 offload: str = "none", recipe: str | None = None, save_dir: str | None = None,
                 data_dir: str | None = None, shared_prefix: bool = True, **kwargs) -> None:
        if offload not in ("none", "cpu", "disk"):
            raise ValueError(f"offload={offload!r}: use none, cpu or disk")
        if pretrained is None and recipe is None:
            raise UserError("model arg pretrained= is missing: give an alias, Hub id or directory (or recipe=FILE)")
        self.compression, kwargs = compression_config(pretrained, recipe, allow_pickle, kwargs, own_args(type(self)))
        if save_dir is not None:
            if self.compression is None:
                raise UserError("save_dir= saves the model compressed on load: add method=NAME or recipe=FILE")
            if Path(save_dir).exists():
                raise UserError(f"save_dir {save_dir} already exists: choose a new directory or remove it")
            checkpoint.ensure_new_output(save_dir)  # fail before the slow part, not after it
        self.allow_pickle, self.offload, self.save_dir, self.data_dir = allow_pickle, offload, save_dir, data_dir
        self.shared_prefix = shared_prefix
        self.contexts_run = 0  # contexts run once for several requests (tests read it)
        self._pads: bool | None = None  # see _pads_contexts
        self.manifest: Manifest | None = None
        if self.compression is not None:
            pretrained = self.compression.model
        location = local_path_or_id(resolve(pretrained)) if isinstance(pretrained, str) else pretrained
        if self.compression is None and isinstance(location, str) and Path(location).is_dir():
            gate.check(location, allow_pickle, bool(kwargs.get("trust_remote_code")))  # before HFLM reads it
        super().__init__(pretrained=location, **self._tokenizer_arg(location, tokenizer, kwargs), **kwargs)
        accelerator = getattr(self, "accelerator", None)  # set by HFLM under a launcher of several processes
        if accelerator is not None and self._world_size == 1:
            # HFLM splits the requests over processes on several GPUs only; on CPUs (gloo) do the same.
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    def _tokenizer_arg(self, location, tokenizer, kwargs: dict) -> dict:
        """HFLM's ``tokenizer``: loaded here from the resolved location (HFLM would otherwise look it up
        by name, on the Hub for an alias)."""
        from transformers import AutoTokenizer

        if tokenizer is None and isinstance(location, str):
            tokenizer = AutoTokenizer.from_pretrained(location,
                                                      trust_remote_code=kwargs.get("trust_remote_code", False))
        return {"tokenizer": tokenizer}

    def _create_model(self, pretrained: str, dtype="auto", trust_remote_code=False, **kwargs) -> None:
        chosen = [name for name in UNSUPPORTED if kwargs.get(name)]
        chosen += [name for name in kwargs if name not in UNSUPPORTED + HFLM_PLUMBING]
        if chosen:
            raise ValueError(f"model type {MODEL_TYPE!r} loads checkpoints as saved; model arg {chosen[0]!r} "
                             f"is not supported (use --model hf for it)")
        if self.compression is None:
            model, _, _ = load_model(pretrained, device=str(self.device), dtype=dtype,
                                     allow_pickle=self.allow_pickle, trust_remote_code=bool(trust_remote_code),
                                     offload=self.offload)
            self.manifest = read_manifest(pretrained) if Path(pretrained).is_dir() else None
        else:
            model = self._compress()
            self._config = model.config  # HFLM read the base model's; this one has fewer blocks
        sync_tied_embeddings(model)
        self._model = model

    def _compress(self):
        """The model compressed in memory on the evaluation's device and placement (saved if asked)."""
        from compress_eval import pipeline

        cfg = self.compression.model_copy(update={"device": str(self.device), "offload": self.offload})
        result = pipeline.compress(cfg, self.data_dir)
        if self.save_dir is not None:
            print(f"saved {pipeline.save(result, self.save_dir)}")
        self.manifest = result.manifest
        return result.model

    def _loglikelihood_tokens(self, requests: list[sp.Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """HFLM's scoring, with the requests that share a context scored from its cache; the rest
        (contexts asked once, requests HFLM truncates) and every request of a model the cache path
        cannot serve (offloaded block by block, multimodal, seq2seq, a forward without ``cache`` and
        ``logits_to_keep``, or ``shared_prefix=False``) take HFLM's own path. Results come back in
        request order; HFLM's request cache is filled for both."""
        if not self._shares_prefixes():
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        groups, alone = sp.group_by_context(requests, self.max_length)
        size = override_bs or (self.batch_size if isinstance(self.batch_size, int) else AUTO_BATCH)
        with bar(desc="shared-prefix requests", total=sum(map(len, groups)), unit="request",
                 disable=disable_tqdm or self.rank != 0) as shown:
            scores = sp.score_shared(self._cached_forward, requests, groups, size, self.softmax_dtype,
                                     self._pads_contexts(), shown.update)
        for i, score in scores.items():
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        self.contexts_run += len(groups)
        if alone:
            rest = super()._loglikelihood_tokens([requests[i] for i in alone], disable_tqdm, override_bs)
            scores.update(zip(alone, rest, strict=True))
        return [scores[i] for i in range(len(requests))]

    def _shares_prefixes(self) -> bool:
        return (self.shared_prefix and self.offload == "none" and self.backend == "causal"
                and not isinstance(self, HFMultimodalLM)
                and not is_multimodal(getattr(self.model.config, "model_type", None))
                and {"cache", "logits_to_keep"} <= set(inspect.signature(self.model.forward).parameters))

    def _pads_contexts(self) -> bool:
        """Whether contexts of different lengths may share a forward: not where a cache layer slides (its
        window counts cache slots, pads included). Asked of the cache the model makes for one token."""
        if self._pads is None:
            _, cache = self._cached_forward(torch.tensor([[self.prefix_token_id]]), None, 1)
            self._pads = all(not getattr(layer, "is_sliding", True) for layer in getattr(cache, "layers", [None]))
        return self._pads

    def _cached_forward(self, input_ids: torch.Tensor, cache, logits_to_keep, attention_mask=None,
                        position_ids=None):
        """The model on ``input_ids`` after ``cache`` (None: from the start), keeping it, under HFLM's
        autocast; only the positions ``logits_to_keep`` names go through the output head (0: all)."""
        def placed(t):
            return t.to(self.device) if isinstance(t, torch.Tensor) else t

        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            out = self.model(placed(input_ids), cache=cache, use_cache=True, logits_to_keep=placed(logits_to_keep),
                             attention_mask=placed(attention_mask), position_ids=placed(position_ids))
        return out.logits, out.cache

    def get_model_info(self) -> dict:
        """HFLM's model info plus what was done to the model: lm-eval merges this into the results'
        ``config``, so every score carries the recipe that made its model."""
        info = super().get_model_info()
        if self.manifest is not None:
            m = self.manifest
            info["compress_eval_recipe"] = m.recipe
            info["compress_eval"] = {
                "method": m.method, "base_model": m.base_model.name, "removed_blocks": m.removed_blocks,
                "blocks_before": m.blocks_before, "blocks_after": m.blocks_after,
                "params_before": m.params_before, "params_after": m.params_after,
                "compressed_on_load": self.compression is not None, "saved_to": self.save_dir}
        return info


@register_model(MULTIMODAL_TYPE)
class CompressedMultimodalLM(CompressedLM, HFMultimodalLM):
    """``--model compressed-multimodal``: ``compressed`` for image tasks (MMMU) on a vision-language model,
    through lm-eval's ``hf-multimodal`` (its model args too: ``max_images``, default MAX_IMAGES here).
    Text requests fall back to the language model, as in ``hf-multimodal``. The processor is read from
    the checkpoint (or from ``tokenizer=``, a processor's name or directory)."""

    def __init__(self, pretrained: str | None = None, max_images: int = MAX_IMAGES, **kwargs) -> None:
        super().__init__(pretrained, max_images=int(max_images), **kwargs)

    def _tokenizer_arg(self, location, tokenizer, kwargs: dict) -> dict:
        """Nothing loaded here: ``_create_tokenizer`` loads the processor (lm-eval's returns a given
        ``tokenizer=`` without setting ``self.processor``, so it travels under another name)."""
        self._processor_source = local_path_or_id(resolve(tokenizer)) if isinstance(tokenizer, str) else tokenizer
        return {}

    def _create_tokenizer(self, pretrained, tokenizer, trust_remote_code: bool | None = False, **kwargs) -> None:
        """``self.processor`` and its ``self.tokenizer``, from ``tokenizer=`` (a processor, or its name or
        directory) or else the model's own directory."""
        from transformers import AutoProcessor, ProcessorMixin

        where = self._processor_source or pretrained
        try:
            processor = where if isinstance(where, ProcessorMixin) else AutoProcessor.from_pretrained(
                where, trust_remote_code=bool(trust_remote_code), **self.pixels)
        except OSError as exc:
            raise UserError(f"{where} has no processor ({str(exc).splitlines()[0]}): image tasks need a vision-"
                            f"language model saved with its processor") from None
        if not isinstance(processor, ProcessorMixin):
            raise UserError(f"{where} is a text model (no image processor): image tasks such as MMMU need a "
                            f"vision-language model")
        self.processor, self.tokenizer = processor, processor.tokenizer
