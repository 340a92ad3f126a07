"""Dataset loaders for compress-eval's lm-eval tasks (``!function ce_loaders.*`` in the YAMLs).

lm-eval calls a task's ``custom_dataset`` with the run's metadata (the model args merged with
``--metadata``), so the perplexity loaders see ``pretrained`` and tokenize with the model's own
tokenizer; ``seqlen`` (default 2048) and ``data_dir`` may be given through ``--metadata``.
"""

from __future__ import annotations

import datasets

from compress_eval.data.benchmarks import load_benchmark, mmmu_files
from compress_eval.data.calibration import eval_windows
from compress_eval.errors import UserError

DEFAULT_SEQLEN = 2048


def _split(split: str, docs: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


def piqa(**meta):
    return _split("validation", load_benchmark("piqa", meta.get("data_dir")))


def arc_easy(**meta):
    return _split("test", load_benchmark("arc_easy", meta.get("data_dir")))


def arc_challenge(**meta):
    return _split("test", load_benchmark("arc_challenge", meta.get("data_dir")))


def hellaswag(**meta):
    return _split("validation", load_benchmark("hellaswag", meta.get("data_dir")))


def winogrande(**meta):
    return _split("validation", load_benchmark("winogrande", meta.get("data_dir")))


def mmmu(**meta):
    """MMMU's validation split as the Hub serves it: the parquet files' own features decode image_1..7
    (read in memory, as the other loaders are, not through the datasets cache)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f) for f in mmmu_files(meta.get("data_dir"))])
    return datasets.DatasetDict({"validation": datasets.Dataset(table)})


def _tokenizer(meta: dict):
    from transformers import AutoTokenizer

    from compress_eval.models.registry import local_path_or_id, resolve

    name = meta.get("tokenizer") or meta.get("pretrained")
    if not isinstance(name, str):
        raise UserError("perplexity tasks tokenize with the model's tokenizer: give pretrained=... in "
                        "--model_args (or tokenizer=... in --metadata)")
    return AutoTokenizer.from_pretrained(local_path_or_id(resolve(name)))


def _decode(tokenizer, ids: list[int]) -> str:
    # Verbatim text: no special tokens dropped, no tokenization-space clean-up, so it re-encodes to ids.
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def window_doc(tokenizer, window: list[int]) -> dict:
    """One window as a loglikelihood request whose scored tokens are the window's tokens 1..n-1.

    lm-eval takes text: it encodes ``context + continuation`` and scores what follows the encoded
    context, after moving the context's trailing whitespace into the continuation. The context is
    the window's first token; only when that token is all whitespace (nothing would be left of it)
    does the context take the next token too, and that one token goes unscored. ``tokens`` counts
    exactly what lm-eval will score.
    """
    k = 1
    while k < len(window) - 1:
        kept = _decode(tokenizer, window[:k]).rstrip()
        if kept and len(tokenizer.encode(kept)) - len(tokenizer.encode("")) == k:
            break
        k += 1
    context, continuation = _decode(tokenizer, window[:k]), _decode(tokenizer, window[k:])
    scored = len(tokenizer.encode(context + continuation)) - len(tokenizer.encode(context.rstrip()))
    return {"context": context, "continuation": continuation, "tokens": scored}


def _windows(dataset: str, meta: dict) -> datasets.DatasetDict:
    tokenizer = _tokenizer(meta)
    seqlen = int(meta.get("seqlen", DEFAULT_SEQLEN))
    windows = eval_windows(tokenizer, dataset, seqlen, meta.get("data_dir"))
    return _split("test", [window_doc(tokenizer, w.tolist()) for w in windows])


def wikitext2_windows(**meta):
    return _windows("wikitext2", meta)


def c4_windows(**meta):
    return _windows("c4", meta)


def window_results(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """Summed log-likelihood and token count; ``weighted_perplexity`` gives exp(-sum ll / sum tokens)."""
    loglikelihood, _ = results[0]
    return {"token_perplexity": (loglikelihood, doc["tokens"])}
