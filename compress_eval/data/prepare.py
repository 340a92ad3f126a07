"""A data directory in shared/data's layout for a user who has none: ``compress-eval data prepare``
writes one from the Hub's own data sets (those the papers and lm-eval's own tasks read), in the forms
our readers take (``corpora``, ``benchmarks``), and ``compress-eval data check`` says whether a directory
serves them. ``MANIFEST.json`` records each file's sha256 and source, so a copy can be verified later.

Once prepared in the default place (``~/.cache/compress-eval/data``) the directory is used without
being named: see ``paths.data_dir``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from compress_eval.data.benchmarks import load_benchmark, mmmu_files
from compress_eval.data.corpora import C4_FILES, WIKITEXT2_TRAIN_TOKENS, c4_documents, hub_dataset, wikitext2_rows
from compress_eval.errors import UserError
from compress_eval.jsonfile import read_json_object, write_json_atomic
from compress_eval.paths import MANIFEST
from compress_eval.tasknames import LM_EVAL_TASKS, PPL_TASKS

# The first 2,000 documents of C4's first validation shard: the 1,100 that perplexity reads, then the
# calibration pool (corpora.c4_documents).
C4_DOCS = 2000
# Each task's files, relative to the data directory: what its readers open, in the writer's order.
TASK_FILES = {
    "wikitext2": ("wikitext2/wikitext-2-raw-v1.test.rows.jsonl", "wikitext2/wikitext-2-raw-v1.validation.rows.jsonl",
                  WIKITEXT2_TRAIN_TOKENS),
    "c4": ("c4/c4_validation_2k.parquet",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("arc/arc_easy.test.llm-foundry.jsonl",),
    "arc_challenge": ("arc/arc_challenge.test.llm-foundry.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "winogrande": ("winogrande/winogrande.dev.llm-foundry.jsonl", "winogrande/dev-labels.lst"),
}
TASKS = tuple(TASK_FILES)


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _lines(values) -> bytes:
    return "".join(f"{v}\n" for v in values).encode()


def _wikitext2():
    """The raw rows of test and validation as ``datasets`` returns them; train as the tokenized
    ``wiki.train.tokens`` (rows joined, a blank row a ``" \\n"`` line), the fine-tune text offline."""
    for split in ("test", "validation"):
        rows = hub_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
        yield _jsonl({"text": r} for r in rows), f"wikitext/wikitext-2-raw-v1 {split}"
    train = hub_dataset("wikitext", "wikitext-2-v1", split="train")["text"]
    yield (gzip.compress("".join(r or " \n" for r in train).encode(), mtime=0),
           "wikitext/wikitext-2-v1 train, rows joined as wiki.train.tokens")


def _c4():
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = C4_FILES["validation"]
    docs = islice(hub_dataset("allenai/c4", data_files={"validation": shard}, split="validation", streaming=True),
                  C4_DOCS)
    table = pa.Table.from_pylist([{k: str(d[k]) for k in ("text", "url", "timestamp")} for d in docs])
    if table.num_rows < C4_DOCS:
        raise UserError(f"allenai/c4 {shard} gave {table.num_rows} documents, fewer than {C4_DOCS}: "
                        f"run data prepare --only c4 again")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    yield sink.getvalue().to_pybytes(), f"allenai/c4 {shard}, first {C4_DOCS} documents"


def _piqa():
    """lm-eval's ``piqa`` data set as its authors ship it: questions, then one label per line."""
    ds = hub_dataset("baber/piqa", split="validation")
    yield _jsonl({k: d[k] for k in ("goal", "sol1", "sol2")} for d in ds), "baber/piqa validation"
    yield _lines(d["label"] for d in ds), "baber/piqa validation, label"


def _arc(subset: str):
    """lm-eval's ``arc_*`` test split in llm-foundry's form (what shared/data holds)."""
    ds = hub_dataset("allenai/ai2_arc", subset, split="test")
    yield _jsonl({"query": f"Question: {d['question']}", "choices": d["choices"]["text"],
                  "gold": d["choices"]["label"].index(d["answerKey"])} for d in ds), f"allenai/ai2_arc {subset} test"


def _hellaswag():
    """lm-eval's ``hellaswag`` validation in the extracted 6-line form: ``activity_label: ctx``, the label,
    the four endings, each cleaned by lm-eval's own ``preprocess`` (``benchmarks.hellaswag`` reads it)."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    lines = []
    for d in hub_dataset("Rowan/hellaswag", split="validation"):
        lines += [preprocess(f"{d['activity_label']}: {d['ctx']}"), str(int(d["label"])),
                  *(preprocess(e) for e in d["endings"])]
    yield bz2.compress(_lines(lines)), "Rowan/hellaswag validation"


def _winogrande():
    """lm-eval's ``winogrande`` (winogrande_xl validation) in llm-foundry's form, with the answer file."""
    ds = hub_dataset("allenai/winogrande", "winogrande_xl", split="validation")
    rows = []
    for d in ds:
        blank = d["sentence"].index("_")
        rows.append({"context_options": [d["sentence"][:blank] + d[o] for o in ("option1", "option2")],
                     "continuation": d["sentence"][blank + 1:].strip(), "gold": int(d["answer"]) - 1})
    yield _jsonl(rows), "allenai/winogrande winogrande_xl validation"
    yield _lines(d["answer"] for d in ds), "allenai/winogrande winogrande_xl validation, answer"


WRITERS = {"wikitext2": _wikitext2, "c4": _c4, "piqa": _piqa, "arc_easy": lambda: _arc("ARC-Easy"),
           "arc_challenge": lambda: _arc("ARC-Challenge"), "hellaswag": _hellaswag, "winogrande": _winogrande}


def parse_only(only: str | None) -> tuple[str, ...]:
    """``--only wikitext2,piqa`` (our short task names too: wiki, arc_e, hs, ...) as task names."""
    if only is None:
        return TASKS
    names = [n.strip() for n in only.split(",") if n.strip()]
    tasks = [PPL_TASKS.get(n) or LM_EVAL_TASKS.get(n) or n for n in names]
    unknown = [n for n, t in zip(names, tasks) if t not in TASK_FILES]
    if unknown or not tasks:
        raise UserError(f"--only {only!r}: {', '.join(unknown) or 'no task'} is not a data set data prepare "
                        f"writes; use some of {', '.join(TASKS)}")
    return tuple(dict.fromkeys(tasks))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def _link(root: Path, source: Path, rel: str) -> str:
    """``root/rel`` a link to ``source/rel`` (the copy stays where it is); returns where it points."""
    target = (source / rel).resolve()
    if not target.is_file():
        raise UserError(f"{source / rel} is missing: --from needs a data directory laid out like shared/data "
                        f"(check it with compress-eval data check {source})")
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).unlink(missing_ok=True)
    (root / rel).symlink_to(target)
    return str(target)


def prepare(root: str | Path, tasks: tuple[str, ...] = TASKS, source: str | Path | None = None) -> dict:
    """Write ``tasks``' files under ``root`` from the Hub (or, with ``source``, link those of a local
    data directory) and add them to ``root/MANIFEST.json``; returns the manifest's entries written."""
    root = Path(root).expanduser()
    manifest_path = root / MANIFEST
    files = (read_json_object(manifest_path) or {}).get("files", {})
    written = {}
    for task in tasks:
        if source is None:
            produced = list(WRITERS[task]())
            for rel, (data, _) in zip(TASK_FILES[task], produced, strict=True):
                _write(root / rel, data)
            origins = [origin for _, origin in produced]
        else:
            origins = [_link(root, Path(source).expanduser(), rel) for rel in TASK_FILES[task]]
        for rel, origin in zip(TASK_FILES[task], origins):
            written[rel] = {"task": task, "sha256": sha256(root / rel), "bytes": (root / rel).stat().st_size,
                            "source": origin}
        files.update(written)
        write_json_atomic(manifest_path, {"files": files})  # after every task: an interrupted run keeps the rest
    return written


@dataclass(frozen=True)
class TaskCheck:
    task: str
    ok: bool
    detail: str


def _documents(task: str, root: Path) -> str:
    """What the readers make of a task's files, counted (they raise on files that do not parse)."""
    if task == "wikitext2":
        with gzip.open(root / WIKITEXT2_TRAIN_TOKENS, "rt", encoding="utf-8") as fh:
            train = sum(1 for _ in fh)
        return (f"{len(wikitext2_rows('test', root))} test rows, {len(wikitext2_rows('validation', root))} "
                f"validation rows, {train} train lines")
    if task == "c4":
        return f"{len(c4_documents('validation', root)) + len(c4_documents('train', root))} documents"
    if task == "mmmu":
        import pyarrow.parquet as pq

        return f"{sum(pq.read_metadata(f).num_rows for f in mmmu_files(root))} questions"
    return f"{len(load_benchmark(task, root))} documents"


def check(root: str | Path) -> list[TaskCheck]:
    """Per task: are its files there, do our readers parse them, and do their hashes match
    MANIFEST.json where there is one. ``mmmu`` is checked when its folder exists (``data easy-vqa``)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: give a data directory (compress-eval data prepare writes one)")
    manifest = (read_json_object(root / MANIFEST) or {}).get("files")
    tasks = [*TASK_FILES, *(["mmmu"] if (root / "mmmu").is_dir() else [])]
    checks = []
    for task in tasks:
        missing = [rel for rel in TASK_FILES.get(task, ()) if not (root / rel).is_file()]
        if missing:
            checks.append(TaskCheck(task, False, f"missing {', '.join(missing)}"))
            continue
        try:
            documents = _documents(task, root)
        except Exception as exc:  # whatever a damaged file raises (JSON, parquet, bz2, a reader's check)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            checks.append(TaskCheck(task, False, f"does not parse: {reason}"))
            continue
        if manifest is None:
            checks.append(TaskCheck(task, True, f"{documents} (no {MANIFEST}: hashes not checked)"))
            continue
        listed = [rel for rel, entry in manifest.items() if entry.get("task") == task]
        differ = [rel for rel in listed if not (root / rel).is_file() or sha256(root / rel) != manifest[rel]["sha256"]]
        if differ:
            checks.append(TaskCheck(task, False, f"sha256 differs from {MANIFEST}: {', '.join(differ)}"))
        else:
            hashes = f"{len(listed)} sha256 as in {MANIFEST}" if listed else f"not in {MANIFEST}"
            checks.append(TaskCheck(task, True, f"{documents}; {hashes}"))
    return checks

