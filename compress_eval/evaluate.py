"""Evaluation of a model or checkpoint, with results stored beside it.

Perplexity tasks run our own loop (the papers' protocol); the benchmarks run through
lm-evaluation-harness with our ``compressed`` model type (``compressed-multimodal`` when a task shows
images), on the offline copies in the data directory (tasks ``ce_*`` in ``tasks/``) or, without one,
on lm-eval's own Hub tasks.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from pathlib import Path

import numpy as np

from compress_eval import distributed
from compress_eval.config import CompressConfig
from compress_eval.data.calibration import eval_windows
from compress_eval.errors import UserError
from compress_eval.eval_config import EvalConfig
from compress_eval.models.adapters import get_adapter
from compress_eval.models.loading import load_model, resolve_device
from compress_eval.models.registry import resolve
from compress_eval.paths import cache_dir
from compress_eval.paths import data_dir as resolve_data_dir
from compress_eval.offload_policy import say_offload
from compress_eval.plan import resolve_offload
from compress_eval.results import store
from compress_eval.scoring.ppl import perplexity
from compress_eval.tasknames import PPL_TASKS, display_name, lm_eval_task_name, split_image_tasks, split_tasks


def evaluate_ppl(model, tokenizer, tasks: list[str], seqlen: int = 2048, data_dir=None,
                 max_windows: int | None = None, batch_size: int = 1, progress: bool = True) -> dict:
    """{task_ppl: {ppl, tokens, windows, seconds, tokens_per_s, window_nlls}} for each perplexity task."""
    if tasks:
        get_adapter(model).require_context(seqlen, "--eval-seqlen (run/compress) or --seqlen (eval/ppl)")
    results = {}
    for task in tasks:
        dataset = PPL_TASKS[task]
        windows = eval_windows(tokenizer, dataset, seqlen, data_dir, max_windows)
        r = perplexity(model, windows, batch_size=batch_size, progress=progress)
        results[f"{dataset}_ppl"] = {"ppl": r.ppl, "tokens": r.tokens, "windows": r.windows, "seqlen": seqlen,
                                     "seconds": round(r.seconds, 2), "tokens_per_s": round(r.tokens_per_second, 1),
                                     "window_nlls": r.window_nlls}
    return results


def evaluation_offload(name_or_dir: str, offload: str, device, dtype, trust_remote_code: bool) -> str:
    """The offload mode of an evaluation (``auto``: from the model's size and the free memory), said."""
    from compress_eval.models.offload import MODES

    if offload not in MODES:
        raise UserError(f"unknown --offload {offload!r}: use {', '.join(MODES)}")
    # Planned as a run that removes nothing: the model's weights and the evaluation's activations.
    choice = resolve_offload(CompressConfig(model=name_or_dir, method="none", device=resolve_device(device),
                                            dtype=dtype, offload=offload, trust_remote_code=trust_remote_code))
    say_offload(*choice)
    return choice.mode


def evaluate(name_or_dir: str, cfg: EvalConfig) -> dict:
    """The perplexity of a model on ``cfg.tasks`` (wikitext2, c4), loaded as ``cfg`` says."""
    offload = evaluation_offload(name_or_dir, cfg.offload, cfg.device, cfg.dtype, cfg.trust_remote_code)
    model, tokenizer, _ = load_model(name_or_dir, cfg.device, cfg.dtype, cfg.allow_pickle, cfg.trust_remote_code,
                                     offload)
    return evaluate_ppl(model, tokenizer, list(cfg.tasks), cfg.seqlen, cfg.data_dir, cfg.max_windows, cfg.ppl_batch,
                        cfg.progress)


# The files that decide a checkpoint's answers (results files written beside them do not).
MODEL_FILES = ("config.json", store.MANIFEST, "tokenizer.json", "tokenizer_config.json", "*.safetensors",
               "preprocessor_config.json", "processor_config.json", "chat_template.*")


def cache_key(name_or_dir: str, dtype, device) -> str:
    """What identifies a model's answers: its files (name, size, time) or its name; dtype; device.

    lm-eval's request cache is keyed by the request text only, so every model needs its own.
    """
    source = resolve(name_or_dir)
    parts = [source.kind, source.location, str(dtype), str(device).split(":")[0]]
    if source.kind == "local":
        files = {f for pattern in MODEL_FILES for f in Path(source.location).glob(pattern)}
        parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(files)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def lm_eval_cache(name_or_dir: str, dtype, device) -> str:
    """The sqlite path prefix of this model's lm-eval request cache (lm-eval appends ``_rank0.db``)."""
    folder = cache_dir() / "lm-eval" / cache_key(name_or_dir, dtype, device)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / "requests")


def sample_indices(manager, names: list[str], cfg: EvalConfig) -> dict[str, list[int]]:
    """lm-eval's ``samples``: a seeded ``cfg.sample`` of each task's documents (sorted: lm-eval maps its
    positions back to document ids through this order). The draw depends on the task's display name, its
    size and the seed only, so every model (and an offline ``ce_`` twin) gets the same documents."""
    from lm_eval.tasks import get_task_dict

    out = {}
    names = [name for name in names if cfg.sample_size(name) is not None]
    for name, task in (get_task_dict(names, manager) if names else {}).items():
        total, n, seed = len(task.eval_docs), cfg.sample_size(name), cfg.sample_seed
        if n < total:
            generator = np.random.default_rng([seed, zlib.crc32(display_name(name).encode())])
            out[name] = sorted(int(i) for i in generator.choice(total, size=n, replace=False))
    return out


def evaluate_lm_eval(lm, name_or_dir: str, cfg: EvalConfig, tasks: list[str]) -> dict:
    """lm-eval's results dict for ``tasks`` (canonical names) on an already built ``compressed`` (or, for
    image tasks, ``compressed-multimodal``) model, with its logged ``samples`` (for the per-document
    records). Image tasks run in the model's chat format when its processor has one (lm-eval's MMMU
    README: scores are reported with --apply_chat_template), text tasks as plain prompts, so a run of
    both is two lm-eval runs merged. ``cfg.gen_kwargs`` (lm-eval's) override the generation settings of
    the generate-until tasks, e.g. ``{"max_gen_toks": 32}``."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from compress_eval.lm_eval_plugin import MODEL_TYPE, MULTIMODAL_TYPE, tasks_dir

    start = time.perf_counter()
    root = resolve_data_dir(cfg.data_dir)
    dtype, device = cfg.dtype or "auto", str(lm.device)
    model_args = {"pretrained": name_or_dir, "dtype": dtype}
    metadata = {**model_args, **({"data_dir": str(root)} if root else {})}
    # Offline, every task is ours: skipping lm-eval's own index saves its scan of ~15k task files.
    manager = TaskManager(include_path=tasks_dir(), include_defaults=root is None, metadata=metadata)
    text_tasks, image_tasks = split_image_tasks(tasks)
    chat = bool(image_tasks) and getattr(getattr(lm, "processor", None), "chat_template", None) is not None
    results: dict = {}
    samples: dict = {}
    for group, apply_chat in ((text_tasks, False), (image_tasks, chat)):
        if not group:
            continue
        names = [lm_eval_task_name(t, root) for t in group]
        try:
            chosen = sample_indices(manager, names, cfg) if cfg.sample else None
            done = simple_evaluate(
                model=lm, model_args=model_args, tasks=names, num_fewshot=cfg.num_fewshot,
                batch_size=cfg.batch_size, device=device, limit=cfg.limit, samples=chosen or None,
                task_manager=manager, use_cache=lm_eval_cache(name_or_dir, dtype, device), log_samples=True,
                apply_chat_template=apply_chat, gen_kwargs=cfg.gen_kwargs)
        except ConnectionError as exc:  # lm-eval's Hub tasks download their data set
            raise UserError(f"cannot download the data of {', '.join(group)} from the Hugging Face Hub "
                            f"({str(exc).splitlines()[0]}): run `compress-eval data prepare` where the Hub is "
                            f"reachable, or use local copies with --data-dir DIR or COMPRESS_EVAL_DATA_DIR=DIR") from None
        samples.update(done.get("samples") or {})
        results = store.merge_lm_eval_results(results, done)
    results["config"]["model"] = MULTIMODAL_TYPE if getattr(lm, "MULTIMODAL", False) else MODEL_TYPE
    # The field lm-eval's own CLI writes (as a string) in its results file.
    results["total_evaluation_time_seconds"] = str(round(time.perf_counter() - start, 2))
    results["samples"] = samples
    return results


def build_lm(name_or_dir: str, cfg: EvalConfig, offload: str, images: bool = False):
    """The lm-eval ``compressed`` model for a name or checkpoint (its .model and .tokenizer serve ppl too);
    with ``images``, ``compressed-multimodal`` (text tasks run on it as well, through the language model)."""
    from compress_eval.lm_eval_plugin import CompressedLM, CompressedMultimodalLM

    if images and str(cfg.batch_size) == "auto":
        raise UserError("--batch-size auto does not work with image tasks (lm-eval's multimodal models have "
                        "no automatic batch size): give a number")
    lm_class = CompressedMultimodalLM if images else CompressedLM
    return lm_class(pretrained=name_or_dir, batch_size=cfg.batch_size, device=resolve_device(cfg.device),
                    dtype=cfg.dtype or "auto", allow_pickle=cfg.allow_pickle,
                    trust_remote_code=cfg.trust_remote_code, offload=offload)


def evaluate_tasks(name_or_dir: str, cfg: EvalConfig) -> tuple[dict, dict | None]:
    """(perplexity results, lm-eval results or None) for ``cfg.tasks``; the model loads once.

    ``cfg.batch_size`` may be ``"auto"`` (lm-eval finds the largest that fits; perplexity then uses 1).
    """
    ppl_tasks, lm_tasks = split_tasks(list(cfg.tasks))
    if not lm_tasks:
        return evaluate(name_or_dir, cfg), None
    for task in lm_tasks:
        lm_eval_task_name(task, cfg.data_dir)  # a ce_ task without a data directory fails before the model loads
    offload = evaluation_offload(name_or_dir, cfg.offload, cfg.device, cfg.dtype, cfg.trust_remote_code)
    lm = build_lm(name_or_dir, cfg, offload, images=bool(split_image_tasks(lm_tasks)[1]))
    ppl = evaluate_ppl(lm.model, lm.tokenizer, ppl_tasks, cfg.seqlen, cfg.data_dir, cfg.max_windows, cfg.ppl_batch,
                       cfg.progress) if ppl_tasks else {}
    return ppl, evaluate_lm_eval(lm, name_or_dir, cfg, lm_tasks)


def evaluate_and_record(target: str, cfg: EvalConfig) -> tuple[dict, dict | None]:
    """Evaluate, and store the results (and their per-document records) in ``target`` when it is one of
    our checkpoint directories."""
    ppl, lm_results = evaluate_tasks(target, cfg)
    if distributed.is_main() and Path(target).is_dir() and store.read_manifest(target) is not None:
        if ppl:
            store.store_ppl_results(target, ppl)
        if lm_results:
            store.store_lm_eval_results(target, lm_results, cfg.selection)
    return ppl, lm_results
