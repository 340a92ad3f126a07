"""Convert easy-vqa (PyPI ``easy-vqa``) into MMMU's schema and layout, for the offline ``ce_mmmu`` task.

    python3 scripts/easy_vqa_to_mmmu.py          # test split -> ~/.cache/compress-eval/data/mmmu
    COMPRESS_EVAL_DATA_DIR=~/.cache/compress-eval/data compress-eval eval DIR --tasks ce_mmmu

``--out`` is the ``mmmu`` folder of a data directory (``$COMPRESS_EVAL_DATA_DIR/mmmu``); the default lies
in our cache (``$COMPRESS_EVAL_CACHE``) because a shared data directory is usually read-only: to use it
beside the text benchmarks, link those into the same data directory (``ln -s SHARED/data/* DIR/``).
The test split (9,673 questions on 1,000 images) becomes MMMU's ``validation`` split, which ce_mmmu
reads; ``--split train`` writes the 38,575 training questions as ``dev``. The output is the same bytes
for the same arguments; never commit it.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

from compress_eval.data.easy_vqa import SPLITS, SUBJECT, chance_accuracy, mmmu_rows, write_mmmu
from compress_eval.errors import UserError
from compress_eval.paths import cache_dir

SOURCE = """# easy-vqa as MMMU-schema multiple choice: {file}

- Made by `scripts/easy_vqa_to_mmmu.py --split {split} --seed {seed} --limit {limit}` from the PyPI package
  `easy-vqa` {version} (MIT; https://github.com/vzhou842/easy-VQA): {n} questions, chance accuracy {chance:.4f}.
- Options are answers of the question's own group (8 colours, 3 shapes, yes/no), at most 4, seeded.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=cache_dir() / "data" / "mmmu",
                        help="the mmmu folder of a data directory (default: %(default)s)")
    parser.add_argument("--split", choices=list(SPLITS), default="test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="a seeded sample of this many questions")
    args = parser.parse_args(argv)
    try:
        rows = mmmu_rows(args.split, args.seed, args.limit)
        path = write_mmmu(rows, args.out, args.split)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    (args.out / SUBJECT / f"SOURCE-{SPLITS[args.split]}.md").write_text(SOURCE.format(
        file=path.name, split=args.split, seed=args.seed, limit=args.limit, version=version("easy-vqa"), n=len(rows),
        chance=chance_accuracy(rows)))
    print(f"wrote {len(rows)} questions to {path} (chance accuracy {chance_accuracy(rows):.4f})")


if __name__ == "__main__":
    main()
