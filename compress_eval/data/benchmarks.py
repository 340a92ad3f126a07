"""Multiple-choice benchmarks from the local data directory (layout of shared/data), as lm-eval docs.

Each reader returns the documents with the fields our task YAMLs (``tasks/``) template over, so
the prompts are exactly those of lm-eval's own ``piqa``, ``arc_*``, ``hellaswag`` and
``winogrande`` tasks. ARC, HellaSwag and WinoGrande come in converted forms (see each
SOURCE.md); where the conversion lost information lm-eval uses, the reader rebuilds it.
"""

from __future__ import annotations

import bz2
import json
from pathlib import Path

from compress_eval.errors import UserError
from compress_eval.paths import data_file
from compress_eval.paths import data_dir as resolve_data_dir

BENCHMARKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande")


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def piqa(root: Path) -> list[dict]:
    """PIQA validation (original files): goal, sol1, sol2 and the 0/1 label from the .lst file."""
    rows = _jsonl(data_file(root, "piqa/valid.jsonl"))
    labels = _labels(data_file(root, "piqa/valid-labels.lst"))
    if len(rows) != len(labels):
        raise UserError(f"piqa: {len(rows)} questions but {len(labels)} labels in {root / 'piqa'}")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y} for r, y in zip(rows, labels)]


def arc(root: Path, subset: str) -> list[dict]:
    """ARC test (llm-foundry form): the question without its "Question: " prefix, choices, gold index."""
    rows = _jsonl(data_file(root, f"arc/{subset}.test.llm-foundry.jsonl"))
    return [{"question": r["query"].removeprefix("Question: "), "choices": r["choices"], "gold": r["gold"]}
            for r in rows]


def hellaswag_query(line: str) -> str:
    """lm-eval's query from the extracted ``activity_label: ctx`` line.

    lm-eval capitalises ``ctx_b`` (the unfinished last sentence); the extracted file joined it to
    ``ctx_a`` uncapitalised, so the fragment after the last sentence end gets its first letter raised.
    """
    head, sep, tail = line.rpartition(". ")
    if not sep:
        label, colon, ctx = line.partition(": ")
        return f"{label}{colon}{ctx[:1].upper()}{ctx[1:]}" if colon else line
    return f"{head}{sep}{tail[:1].upper()}{tail[1:]}"


def _clean(text: str) -> str:
    """The last steps of lm-eval's HellaSwag ``preprocess`` (the extractor already removed the tags)."""
    return text.strip().replace("  ", " ")


def hellaswag(root: Path) -> list[dict]:
    """HellaSwag validation (extracted text form: 6 lines per item, query / label / 4 endings)."""
    with bz2.open(data_file(root, "hellaswag/hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    lines = lines[:len(lines) - len(lines) % 6]
    docs = []
    for i in range(0, len(lines), 6):
        query, label, *endings = lines[i:i + 6]
        docs.append({"query": hellaswag_query(_clean(query)), "choices": [_clean(e) for e in endings],
                     "label": int(label)})
    return docs


def winogrande(root: Path) -> list[dict]:
    """WinoGrande dev (llm-foundry form): the two sentence prefixes, the text after the blank, gold.

    The gold index is checked against the original answer file, so a misaligned copy is an error.
    """
    rows = _jsonl(data_file(root, "winogrande/winogrande.dev.llm-foundry.jsonl"))
    answers = _labels(data_file(root, "winogrande/dev-labels.lst"))
    if len(rows) != len(answers) or any(r["gold"] != a - 1 for r, a in zip(rows, answers)):
        raise UserError(f"winogrande: {root / 'winogrande'} has gold indexes that disagree with dev-labels.lst")
    return [{"options": r["context_options"], "continuation": r["continuation"], "gold": r["gold"]} for r in rows]


def _root(name: str, data_dir: str | Path | None, hub_task: str) -> Path:
    root = resolve_data_dir(data_dir)
    if root is None:
        raise UserError(f"the offline {name} task needs a data directory: set COMPRESS_EVAL_DATA_DIR "
                        f"(or pass data_dir; `compress-eval data prepare` writes one), or use lm-eval's own `{hub_task}` task from the Hub")
    return root


def mmmu_files(data_dir: str | Path | None = None) -> list[Path]:
    """MMMU's validation files in the data directory, in the Hub data set's own layout and schema
    (MMMU/MMMU: ``mmmu/<Subject>/validation-*.parquet``), so a snapshot of it serves as it is, and so does
    the easy-vqa copy that ``compress-eval data easy-vqa`` writes."""
    folder = data_file(_root("mmmu", data_dir, "mmmu_val"), "mmmu")
    files = sorted(folder.glob("*/validation-*.parquet"))
    if not files:
        raise UserError(f"no MMMU validation files (SUBJECT/validation-*.parquet) in {folder}: copy the MMMU/MMMU "
                        f"data set there, or make one with `compress-eval data easy-vqa --out {folder}`")
    return files


def load_benchmark(name: str, data_dir: str | Path | None = None) -> list[dict]:
    """The documents of one benchmark from the data directory (flag or $COMPRESS_EVAL_DATA_DIR)."""
    root = _root(name, data_dir, name)
    if name in ("arc_easy", "arc_challenge"):
        return arc(root, name)
    readers = {"piqa": piqa, "hellaswag": hellaswag, "winogrande": winogrande}
    if name not in readers:
        raise UserError(f"unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")
    return readers[name](root)
