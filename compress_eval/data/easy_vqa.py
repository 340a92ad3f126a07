"""easy-vqa (PyPI ``easy-vqa``, MIT: 64x64 images of one coloured shape, questions answered by a colour,
a shape or yes/no) as multiple-choice questions in MMMU's own schema, so that the offline ``ce_mmmu`` task
(lm-eval's MMMU prompt and answer parsing) has real image questions, and a VLM can be trained on the
same prompts. The options of a question are answers of its own group (never a colour for a shape
question): every answer of the group when it has at most MAX_OPTIONS, else the answer and MAX_OPTIONS - 1
others drawn from a seeded generator, shuffled.
"""

from __future__ import annotations

import random
from pathlib import Path

from compress_eval.errors import UserError

MAX_OPTIONS = 4
SHAPES = ("circle", "rectangle", "triangle")
YES_NO = ("yes", "no")
SUBJECT = "EasyVQA"  # the one "subject" folder, as MMMU/MMMU has one per subject
SPLITS = {"train": "dev", "test": "validation"}  # easy-vqa's splits -> the MMMU split names written
MMMU_IMAGES = 7  # MMMU's image_1 .. image_7 columns
INSTALL = "pip install 'compress-eval[multimodal]' (or make setup)"
SOURCE = """# easy-vqa as MMMU-schema multiple choice: {file}

- Made by `compress-eval data easy-vqa --split {split} --seed {seed} --limit {limit}` from the PyPI package
  `easy-vqa` {version} (MIT; https://github.com/vzhou842/easy-VQA): {n} questions, chance accuracy {chance:.4f}.
- Options are answers of the question's own group (8 colours, 3 shapes, yes/no), at most 4, seeded.
"""


def _package():
    """The easy_vqa module: an optional extra, so its absence is one line naming the extra."""
    try:
        import easy_vqa
    except ImportError:
        raise UserError(f"easy-vqa is not installed: {INSTALL}") from None
    return easy_vqa


def answer_groups() -> dict[str, tuple[str, ...]]:
    """Each of easy-vqa's 13 answers -> the answers of its group (colours, shapes, yes/no)."""
    answers = _package().get_answers()
    colours = tuple(a for a in answers if a not in SHAPES + YES_NO)
    return {a: group for group in (colours, SHAPES, YES_NO) for a in group}


def split_questions(split: str) -> tuple[list[str], list[str], list[int], list[str]]:
    """(question texts, answers, image ids, image paths) of an easy-vqa split."""
    if split not in SPLITS:
        raise UserError(f"unknown easy-vqa split {split!r}: use {' or '.join(SPLITS)}")
    package = _package()
    texts, answers, image_ids = (package.get_train_questions if split == "train" else package.get_test_questions)()
    paths = (package.get_train_image_paths if split == "train" else package.get_test_image_paths)()
    return texts, answers, image_ids, paths


def mmmu_rows(split: str = "test", seed: int = 0, limit: int | None = None) -> list[dict]:
    """Questions of an easy-vqa split in MMMU's schema (``options`` a Python list literal, ``answer`` a
    letter, ``image_1`` as {bytes, path}; ``<image 1>`` in the question, which is how lm-eval's MMMU
    prompt finds its images). ``limit``: a seeded sample of that many questions, in their order."""
    texts, answers, image_ids, paths = split_questions(split)
    groups = answer_groups()
    picked = range(len(texts))
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be positive, got {limit}")
        picked = sorted(random.Random(seed).sample(picked, min(limit, len(texts))))
    name = SPLITS[split]
    rows = []
    for i in picked:
        rng = random.Random(f"{seed}-{split}-{i}")  # each question's options alone decide its letters
        group = groups[answers[i]]
        others = [a for a in group if a != answers[i]]
        options = [answers[i], *rng.sample(others, min(len(others), MAX_OPTIONS - 1))]
        rng.shuffle(options)
        kind = "yes/no" if group == YES_NO else "shape" if group == SHAPES else "colour"
        rows.append({
            "id": f"{name}_{SUBJECT}_{i + 1}", "question": f"<image 1> {texts[i][:1].upper()}{texts[i][1:]}",
            "options": repr(options), "explanation": "",
            "image_1": {"bytes": Path(paths[image_ids[i]]).read_bytes(), "path": f"{image_ids[i]}.png"},
            **{f"image_{k}": None for k in range(2, MMMU_IMAGES + 1)},
            "img_type": "['Diagrams']", "answer": chr(ord("A") + options.index(answers[i])),
            "topic_difficulty": "Easy", "question_type": "multiple-choice", "subfield": kind})
    return rows


def image_labels(split: str = "train") -> tuple[list[str], dict[str, list[str | None]]]:
    """(image paths, {"colour": [...], "shape": [...]}) of an easy-vqa split: each image's colour and shape
    as its questions and answers state them (a colour or shape answer; a yes/no question naming one,
    its answer flipped by a "not" or "no"), None where none of its questions does. easy-vqa ships no image labels;
    these are what a vision tower can learn before it learns to answer."""
    texts, answers, image_ids, paths = split_questions(split)
    groups = answer_groups()
    colours = groups[next(a for a in groups if groups[a] not in (SHAPES, YES_NO))]
    labels: dict[str, list[str | None]] = {"colour": [None] * len(paths), "shape": [None] * len(paths)}
    for text, answer, image in zip(texts, answers, image_ids):
        words = text.rstrip("?").split()
        named = [w for w in words if w in colours + SHAPES]
        if answer in YES_NO:
            if len(named) == 1 and (answer == "yes") != bool({"not", "no"} & set(words)):
                labels["colour" if named[0] in colours else "shape"][image] = named[0]
            continue
        labels["colour" if answer in colours else "shape"][image] = answer
        if named:  # "what is the blue shape?" -> rectangle: the colour is in the question
            labels["colour" if named[0] in colours else "shape"][image] = named[0]
    return paths, labels


def chance_accuracy(rows: list[dict]) -> float:
    """The expected accuracy of a uniformly random choice among each question's options."""
    import ast

    return sum(1 / len(ast.literal_eval(r["options"])) for r in rows) / len(rows)


def write_mmmu(rows: list[dict], out: str | Path, split: str = "test") -> Path:
    """Write ``rows`` as ``OUT/EasyVQA/<split>-00000-of-00001.parquet`` with MMMU's features (images
    decode to PIL on reading, as from the Hub); returns the file."""
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"), "question": datasets.Value("string"), "options": datasets.Value("string"),
        "explanation": datasets.Value("string"),
        **{f"image_{k}": datasets.Image() for k in range(1, MMMU_IMAGES + 1)},
        "img_type": datasets.Value("string"), "answer": datasets.Value("string"),
        "topic_difficulty": datasets.Value("string"), "question_type": datasets.Value("string"),
        "subfield": datasets.Value("string")})
    path = Path(out) / SUBJECT / f"{SPLITS[split]}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def convert(out: str | Path, split: str = "test", seed: int = 0, limit: int | None = None) -> tuple[Path, list[dict]]:
    """``compress-eval data easy-vqa``: write a split into ``out`` (a data directory's ``mmmu`` folder) with
    a SOURCE file saying how it was made; returns the parquet file and its rows. Same arguments, same bytes."""
    from importlib.metadata import version

    rows = mmmu_rows(split, seed, limit)
    path = write_mmmu(rows, out, split)
    (path.parent / f"SOURCE-{SPLITS[split]}.md").write_text(SOURCE.format(
        file=path.name, split=split, seed=seed, limit=limit, version=version("easy-vqa"), n=len(rows),
        chance=chance_accuracy(rows)))
    return path, rows
