"""Text corpora in the papers' protocol, from the Hub or from a local directory.

The local layout is that of shared/data: ``wikitext2/wikitext-2-raw-v1.{test,validation}.rows.jsonl``
(the HF rows exactly) and ``c4/c4_validation_2k.parquet``.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress_eval.errors import UserError
from compress_eval.paths import DATA_DIR_ENV, data_file, prepared_data_dir
from compress_eval.paths import data_dir as resolve_data_dir

DATASETS = ("wikitext2", "c4")
# The C4 protocol of GPTQ / SparseGPT / SLEB / FuseGPT: the first 1100 validation documents.
C4_EVAL_DOCS = 1100
# The papers' C4 shards on the Hub (allenai/c4): evaluation documents from the first, calibration from the other.
C4_FILES = {"validation": "en/c4-validation.00000-of-00008.json.gz", "train": "en/c4-train.00000-of-01024.json.gz"}


def _check_dataset(name: str) -> None:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")


def hub_dataset(path: str, *args, **kwargs):
    """``datasets.load_dataset`` for users online; offline (or the Hub unreachable) a one-line error
    that names the local alternative."""
    from datasets import load_dataset

    try:
        return load_dataset(path, *args, **kwargs)
    except OSError as exc:  # ConnectionError, a missing file on the Hub, offline mode
        raise UserError(f"cannot load {path!r} from the Hugging Face Hub ({str(exc).splitlines()[0]}): "
                        f"run `compress-eval data prepare` where the Hub is reachable (then copy its "
                        f"{prepared_data_dir()} here), or use local data with --data-dir DIR or {DATA_DIR_ENV}=DIR"
                        ) from None


def wikitext2_rows(split: str, data_dir: Path | None) -> list[str]:
    """The rows of ``wikitext-2-raw-v1`` (``test``, ``validation`` or ``train``), empty rows kept."""
    if data_dir is not None:
        if split == "train":
            split = "validation"  # raw train is not available offline; validation stays disjoint from test
        path = data_file(data_dir, f"wikitext2/wikitext-2-raw-v1.{split}.rows.jsonl")
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line)["text"] for line in fh]
    return list(hub_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])


def c4_documents(split: str, data_dir: Path | None) -> list[str]:
    """C4 ``en`` documents: ``validation`` (evaluation) or ``train`` (calibration).

    Offline there is only a 2000-document validation subset: its first 1100 documents are the
    evaluation set and the rest serve as calibration data, so the two never overlap.
    """
    if data_dir is not None:
        import pyarrow.parquet as pq

        docs = pq.read_table(data_file(data_dir, "c4/c4_validation_2k.parquet"), columns=["text"])
        texts = docs.column("text").to_pylist()
        return texts[:C4_EVAL_DOCS] if split == "validation" else texts[C4_EVAL_DOCS:]
    ds = hub_dataset("allenai/c4", data_files={split: C4_FILES[split]}, split=split)
    texts = ds["text"]
    return list(texts[:C4_EVAL_DOCS]) if split == "validation" else list(texts)


# Offline, WikiText-2's train split exists only in its tokenized form (``@-@``, ``<unk>``): text for
# fine-tunes, never for calibration (whose offline stand-in stays the raw validation split).
WIKITEXT2_TRAIN_TOKENS = "wikitext2/wiki.train.tokens.gz"


def training_text(dataset: str, data_dir: str | Path | None, max_chars: int) -> str:
    """The first ``max_chars`` characters of a corpus' train split, for recovery fine-tunes: WikiText-2
    train (offline its tokenized file), C4's train shard (offline the local documents after the
    evaluation ones). Disjoint from every evaluation split."""
    _check_dataset(dataset)
    root = resolve_data_dir(data_dir)
    if dataset == "wikitext2" and root is not None:
        import gzip

        with gzip.open(data_file(root, WIKITEXT2_TRAIN_TOKENS), "rt", encoding="utf-8") as fh:
            return fh.read(max_chars)
    return corpus_text(dataset, "train", data_dir)[:max_chars]


def corpus_text(dataset: str, split: str, data_dir: str | Path | None = None) -> str:
    """The whole corpus as one string, joined the way the papers join it."""
    _check_dataset(dataset)
    root = resolve_data_dir(data_dir)
    if dataset == "wikitext2":
        return "\n\n".join(wikitext2_rows(split, root))
    return " ".join(c4_documents(split, root))


def eval_split(dataset: str) -> str:
    return "test" if dataset == "wikitext2" else "validation"
