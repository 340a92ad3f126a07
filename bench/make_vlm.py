"""A LLaVA that can see, built offline: the packaged SmolLM2-135M-Instruct as its language model (frozen),
a small CLIP vision tower from scratch and LLaVA's two-layer projector, trained together on easy-vqa's
train split (LLaVA's stage one: only the vision side learns). No real VLM ships on PyPI; this one makes
compression's cost on image questions measurable (bench/multimodal.py, the ce_mmmu task).

    python3 bench/make_vlm.py                         # train, save, report (cached: reruns only report)
    python3 bench/make_vlm.py --steps 3 --eval-questions 8 --out /tmp/vlm-smoke --force   # a smoke run

The model is a plain llava-hf checkpoint (``AutoModelForImageTextToText`` / ``AutoProcessor``) in our cache
(``$COMPRESS_EVAL_CACHE/models/llava-smollm2-easyvqa``), never committed. Training sees exactly the
prompts ce_mmmu shows (lm-eval's MMMU prompt in the chat format, the option letter as the answer), and
accuracy is measured on easy-vqa's test split with lm-eval's MMMU answer parsing. The image token is one
of SmolLM2's unused special tokens, so the vocabulary is SmolLM2's own and the VLM's text perplexity must
equal SmolLM2's: the script checks it on WikiText-2 (the data directory's, as ``compress-eval ppl``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from compress_eval.data.easy_vqa import chance_accuracy, mmmu_rows
from compress_eval.data.image_text import chat_prompt, question_image
from compress_eval.errors import UserError
from compress_eval.evaluate import evaluate
from compress_eval.models.checkpoint import atomic_output_dir
from compress_eval.models.loading import resolve_device
from compress_eval.models.registry import ensure_packaged
from compress_eval.paths import cache_dir

BASE = "smollm2-135m"
IMAGE_TOKEN = "<empty_output>"  # one of SmolLM2's special tokens that nothing else uses
IMAGE_SIZE, PATCH = 64, 16  # easy-vqa's 64x64 images in 16 patches: 16 image tokens per question
REPORT = "make_vlm.json"
# ChatML (SmolLM2's format) over lm-eval's multimodal messages: content is text or a list of parts.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                 "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + IMAGE_TOKEN +
                 "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_vlm(seed: int):
    """(model, processor): SmolLM2's weights in the language model (its tied head included), a fresh
    4-layer CLIP tower and projector."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    base_dir = ensure_packaged(BASE)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=256, intermediate_size=1024,
                              num_hidden_layers=4, num_attention_heads=4)
    config = LlavaConfig(vision_config=vision, text_config=base.config,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="default", vision_feature_layer=-1,  # the tower is ours
                         tie_word_embeddings=base.config.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(base.model.state_dict())
    model.tie_weights()  # SmolLM2's head is its embeddings (the text check below fails otherwise)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(images, tokenizer, patch_size=PATCH, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    return model, processor


def encode(processor, rows: list[dict], answers: bool, device="cpu"):
    """A padded batch on ``device``: with ``answers``, each prompt followed by its letter and end of turn,
    labels on those alone (right padding); without, the prompts left-padded for generation."""
    from lm_eval.tasks.mmmu.utils import doc_to_text

    tokenizer = processor.tokenizer
    enc = processor(images=[question_image(r) for r in rows], text=[chat_prompt(processor, doc_to_text(r)) for r in rows])
    ids, labels = [], []
    for prompt, row in zip(enc["input_ids"], rows):
        target = tokenizer(row["answer"] + tokenizer.eos_token, add_special_tokens=False).input_ids if answers else []
        ids.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(map(len, ids))
    pad = [width - len(x) for x in ids]
    fill = tokenizer.pad_token_id

    def padded(seqs, value):
        return torch.tensor([s + [value] * n if answers else [value] * n + s for s, n in zip(seqs, pad)],
                            device=device)

    batch = {"input_ids": padded(ids, fill), "attention_mask": padded([[1] * len(x) for x in ids], 0),
             "pixel_values": torch.from_numpy(np.stack(enc["pixel_values"])).to(device)}
    return (batch, padded(labels, -100)) if answers else batch


def train(model, processor, rows: list[dict], steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """AdamW on the vision tower and projector (the language model frozen), warm-up then cosine decay;
    returns the loss of every step."""
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = random.Random(seed)
    model.train()
    losses = []
    for step in range(steps):
        batch, labels = encode(processor, rng.sample(rows, batch_size), answers=True, device=model.device)
        loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model, processor, rows: list[dict], batch_size: int) -> dict:
    """ce_mmmu's score (lm-eval's MMMU answer parsing of a greedy answer) over ``rows``, overall and by
    question kind, with the chance level of each."""
    from lm_eval.tasks.mmmu.utils import process_results

    right: dict[str, list[float]] = {}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = encode(processor, chunk, answers=False, device=model.device)
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        for row, tokens in zip(chunk, out[:, batch["input_ids"].size(1):]):
            answer = processor.tokenizer.decode(tokens, skip_special_tokens=True)
            right.setdefault(row["subfield"], []).append(process_results(row, [answer])["acc"])
    every = [r for kind in right.values() for r in kind]
    kinds = {kind: [r for r in rows if r["subfield"] == kind] for kind in right}
    return {"accuracy": sum(every) / len(every), "chance": chance_accuracy(rows), "questions": len(every),
            "by_kind": {k: {"accuracy": sum(v) / len(v), "chance": chance_accuracy(kinds[k]), "questions": len(v)}
                        for k, v in right.items()}}


def text_ppl_check(vlm_dir: Path, data_dir, windows: int, device: str) -> dict:
    """WikiText-2 perplexity (512-token windows) of SmolLM2 and of the saved VLM's language model: equal,
    or the VLM is not SmolLM2 inside."""
    scores = {name: evaluate(name, ["wikitext2"], 512, data_dir, windows, device=device, progress=False)
              ["wikitext2_ppl"]["ppl"] for name in (BASE, str(vlm_dir))}
    smollm2, vlm = scores[BASE], scores[str(vlm_dir)]
    if not math.isclose(smollm2, vlm, rel_tol=1e-5):
        raise SystemExit(f"error: the VLM's text perplexity {vlm:.4f} differs from SmolLM2's {smollm2:.4f}")
    return {"smollm2": smollm2, "vlm": vlm, "windows": windows, "seqlen": 512}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=cache_dir() / "models" / "llava-smollm2-easyvqa")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-questions", type=int, default=1000, help="a seeded sample of the test split")
    parser.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 windows of the text check")
    parser.add_argument("--data-dir", default=None, help="the data directory (default: $COMPRESS_EVAL_DATA_DIR)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: the GPU if there is one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even when --out holds a model")
    args = parser.parse_args(argv)
    report_path = args.out / REPORT
    if report_path.is_file() and not args.force:
        print(f"{args.out} is built (--force rebuilds it):\n{report_path.read_text()}")
        return
    try:
        if args.force and args.out.exists():
            shutil.rmtree(args.out)
        device = resolve_device(args.device)
        model, processor = build_vlm(args.seed)
        rows = mmmu_rows("train", args.seed)
        start = time.perf_counter()
        losses = train(model.to(device), processor, rows, args.steps, args.batch_size, args.lr, args.seed)
        seconds = time.perf_counter() - start
        test = accuracy(model, processor, mmmu_rows("test", args.seed, args.eval_questions), args.batch_size)
        with atomic_output_dir(args.out) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        report = {"base": BASE, "vision": model.config.vision_config.to_diff_dict(),
                  "image_tokens": (IMAGE_SIZE // PATCH) ** 2, "steps": args.steps, "batch_size": args.batch_size,
                  "lr": args.lr, "seed": args.seed, "device": device, "train_seconds": round(seconds, 1),
                  "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
                  "test": test, "text_ppl": text_ppl_check(args.out, args.data_dir, args.ppl_windows, device)}
    except UserError as exc:
        sys.exit(f"error: {exc}")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
