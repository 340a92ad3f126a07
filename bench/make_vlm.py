"""A LLaVA that sees, built offline: the packaged SmolLM2-135M-Instruct as its language model, a
small CLIP vision tower from scratch and LLaVA's two-layer projector, built in three stages on easy-vqa's
train split, so that compression's cost on image questions is measurable (bench/multimodal.py, ce_mmmu).

1. The tower learns colour (8) and shape (3) as a classifier: every patch feature predicts the image's
   labels, as its train questions and answers state them (``image_labels``), each patch on its own.
   Trained end to end through the frozen LM alone, the tower stayed blind (0.525 against 0.448 for
   chance, all of it yes/no).
2. The projector learns, without the LM, to put the mean of the embeddings of the colour word and the
   shape word on every image token: the LM starts by reading words it knows.
3. A short end-to-end stage on exactly the prompts ce_mmmu shows (lm-eval's MMMU prompt in the chat
   format, the option letter as the answer) tunes the projector and a small LoRA on the LM, merged after:
   SmolLM2-135M alone does not answer that format even from written words. The LM stays SmolLM2: its
   WikiText-2 perplexity must stay within --max-ppl-ratio (5 %) of SmolLM2's, checked and recorded.

    python3 bench/make_vlm.py                         # build, save, report (cached: reruns only report)
    python3 bench/make_vlm.py --tower-epochs 1 --projector-epochs 1 --steps 3 --per-kind 8 --out /tmp/vlm-smoke --force

The model is a plain llava-hf checkpoint (``AutoModelForImageTextToText`` / ``AutoProcessor``) in our cache
(``$COMPRESS_EVAL_CACHE/models/llava-smollm2-easyvqa``), never committed. Accuracy is measured on a seeded
test sample with ``--per-kind`` questions of each kind, with lm-eval's MMMU answer parsing. The image token
is one of SmolLM2's unused special tokens, so the vocabulary is SmolLM2's own; the text check runs on
WikiText-2 (the data directory's, as ``compress-eval ppl``).
The same seed on the same machine (and thread count) gives the same model and accuracy; bf16 autocast is
used only on a CUDA device or a CPU with AVX512-BF16/AMX (fp32 otherwise).
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
from compress_eval.eval_config import EvalConfig
from compress_eval.evaluate import evaluate
from compress_eval.models.checkpoint import atomic_output_dir
from compress_eval.models.loading import resolve_device
from compress_eval.models.registry import ensure_packaged
from compress_eval.paths import cache_dir

BASE = "smollm2-135m"
IMAGE_TOKEN = "<empty_output>"  # one of SmolLM2's special tokens that nothing else uses
IMAGE_SIZE = 64  # easy-vqa's 64x64 images: (64 / --patch)^2 image tokens per question
REPORT = "make_vlm.json"
# ChatML (SmolLM2's format) over lm-eval's multimodal messages: content is text or a list of parts.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
                 "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + IMAGE_TOKEN +
                 "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_vlm(seed: int, patch: int = 16, width: int = 256, layers: int = 4):
    """(model, processor): SmolLM2's weights in the language model (its tied head included), a fresh
    CLIP tower (``layers`` of ``width``, ``patch``-pixel patches) and projector."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    base_dir = ensure_packaged(BASE)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=patch, hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=layers, num_attention_heads=4)
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
    processor = LlavaProcessor(images, tokenizer, patch_size=patch, vision_feature_select_strategy="default",
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


def bf16_native(device: str) -> bool:
    """Whether the hardware computes bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX (emulated bf16
    on a CPU is slower than fp32)."""
    if torch.device(device).type == "cuda":
        return True
    info = Path("/proc/cpuinfo")
    return info.is_file() and bool({"avx512_bf16", "amx_bf16"} & set(info.read_text().split()))


def autocast(device: str):
    return torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16_native(device))


def tower_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The patch features the VLM projects (its vision feature layer, the CLS token dropped)."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def labelled_images(processor, split: str, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel values, colour index, shape index) of a split's images; -100 where no question says."""
    from PIL import Image

    from compress_eval.data.easy_vqa import SHAPES, answer_groups, image_labels

    paths, labels = image_labels(split)
    colours = answer_groups()[next(c for c in labels["colour"] if c is not None)]
    pixels = processor.image_processor([Image.open(paths[i]).convert("RGB") for i in range(len(paths))],
                                       return_tensors="pt")["pixel_values"]
    index = [lambda c: colours.index(c), lambda s: SHAPES.index(s)]
    targets = [torch.tensor([-100 if v is None else f(v) for v in labels[kind]])
               for kind, f in zip(("colour", "shape"), index)]
    return pixels.to(device), targets[0].to(device), targets[1].to(device)


def batches(n: int, batch_size: int, epochs: int, seed: int):
    """Seeded shuffled index batches over ``epochs`` passes."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield from torch.randperm(n, generator=g).split(batch_size)


def fit(params, losses, steps: int, lr: float) -> list[float]:
    """AdamW over ``losses`` (an iterator of scalar losses), warm-up then cosine decay; each loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / steps))))
    seen = []
    for step, loss in enumerate(losses):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seen.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps}  loss {loss.item():.4f}", flush=True)
    return seen


def train_tower(model, train, epochs: int, batch_size: int, lr: float, seed: int, device: str) -> dict:
    """Stage 1: every patch feature predicts its image's colour and shape (linear heads, each patch's own
    cross-entropy; the heads are dropped after). Each patch, not only their mean, must carry both labels:
    stage 2 maps every image token to a word, and with the logits averaged over the patches (the first
    build) the projector could not (relative error 0.39) and the VLM stayed near chance."""
    pixels, colour, shape = train
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(width, 8), torch.nn.Linear(width, 3)]).to(device)
    tower = model.model.vision_tower
    tower.train()

    def losses():
        for idx in batches(len(pixels), batch_size, epochs, seed):
            with autocast(device):
                feats = tower_features(model, pixels[idx])
                yield sum(torch.nn.functional.cross_entropy(head(feats).float().flatten(0, 1),
                                                            target[idx].repeat_interleave(feats.size(1)))
                          for head, target in zip(heads, (colour, shape)))

    steps = epochs * math.ceil(len(pixels) / batch_size)
    seen = fit([*tower.parameters(), *heads.parameters()], losses(), steps, lr)
    tower.eval()
    return {"steps": steps, "loss_first": seen[0], "loss_last": seen[-1], "heads": heads}


@torch.no_grad()
def tower_accuracy(model, heads, images, device: str) -> dict:
    """Each label's accuracy from the mean of the patch predictions, on labelled images."""
    pixels, *targets = images
    out = {}
    for kind, head, target in zip(("colour", "shape"), heads, targets):
        with autocast(device):
            pred = torch.cat([head(tower_features(model, p)).float().mean(1).argmax(-1) for p in pixels.split(256)])
        known = target != -100
        out[kind] = (pred[known] == target[known]).float().mean().item()
    return out


def word_embeddings(model, tokenizer, words) -> torch.Tensor:
    """The LM's input embedding of each word's first token (as it follows a space)."""
    ids = [tokenizer(" " + w, add_special_tokens=False).input_ids[0] for w in words]
    return model.get_input_embeddings().weight[ids].detach()


def train_projector(model, processor, train, epochs: int, batch_size: int, lr: float, seed: int, device: str) -> dict:
    """Stage 2: the projector maps the frozen tower's patch features to the mean of the embeddings of the
    colour word and the shape word, on every image token, on images with both labels; no LM runs.

    One target for every token: the projector sees each token alone, so a target that depends on the
    token's place (the colour word on even tokens, the shape word on odd ones, as first built) asks it for
    the place's parity, which the features barely hold, and it learned only the mean word (relative error
    0.38-0.41, what the group means give). In the mean of the two words, a question's options (all of
    one group) still find their word: the other group's half is about equally far from each of them."""
    from compress_eval.data.easy_vqa import SHAPES, answer_groups

    pixels, colour, shape = train
    both = (colour != -100) & (shape != -100)
    pixels, colour, shape = pixels[both], colour[both], shape[both]
    colours = answer_groups()["red"]
    with torch.no_grad(), autocast(device):
        feats = torch.cat([tower_features(model, p).float() for p in pixels.split(256)])
    words = [word_embeddings(model, processor.tokenizer, group) for group in (colours, SHAPES)]
    projector = model.model.multi_modal_projector

    def losses():
        for idx in batches(len(feats), batch_size, epochs, seed):
            target = ((words[0][colour[idx]] + words[1][shape[idx]]) / 2)[:, None].expand(-1, feats.size(1), -1)
            with autocast(device):
                yield torch.nn.functional.mse_loss(projector(feats[idx]).float(), target) / target.pow(2).mean()

    steps = epochs * math.ceil(len(feats) / batch_size)
    seen = fit(list(projector.parameters()), losses(), steps, lr)
    return {"steps": steps, "relative_mse_first": seen[0], "relative_mse_last": seen[-1]}


def lm_lora(model, rank: int) -> list[torch.nn.Parameter]:
    """LoRA factors on every linear of the language model (none with ``rank`` 0), trainable; merged into
    its weights after stage 3 (recovery's ``merge_lora_``), so the checkpoint stays a plain llava."""
    if rank == 0:
        return []
    from peft import LoraConfig, inject_adapter_in_model

    lm = model.model.language_model
    names = sorted({n.rpartition(".")[2] for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=names), lm)
    params = [p for n, p in lm.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def train_end_to_end(model, processor, rows: list[dict], steps: int, batch_size: int, lr: float, seed: int,
                     lora_rank: int) -> dict:
    """Stage 3: the projector, and LoRA on the LM when ``lora_rank`` > 0, learn to answer ce_mmmu's prompts
    with the option letter (the tower stays as stage 1 left it). SmolLM2-135M alone cannot answer that
    format even when the image is written out as words (0.41 against 0.36 for chance, with or without the
    words: its letter does not depend on them), so a frozen LM caps the VLM near chance; the LoRA is kept
    small and short, and the text check bounds what it changes."""
    from compress_eval.methods.recovery import merge_lora_

    model.requires_grad_(False)
    projector = model.model.multi_modal_projector.requires_grad_(True)
    adapters = lm_lora(model, lora_rank)
    rng = random.Random(seed)
    device = str(model.device)

    def losses():
        for _ in range(steps):
            batch, labels = encode(processor, rng.sample(rows, batch_size), answers=True, device=device)
            with autocast(device):
                yield model(**batch, labels=labels, use_cache=False).loss

    model.train()
    seen = fit([*projector.parameters(), *adapters], losses(), steps, lr)
    model.eval()
    if adapters:
        merge_lora_(model)
        model.requires_grad_(False)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "lm_lora_rank": lora_rank, "loss_first": seen[0],
            "loss_last10": sum(seen[-10:]) / len(seen[-10:])}


def test_sample(seed: int, per_kind: int) -> list[dict]:
    """A seeded sample of easy-vqa's test questions with ``per_kind`` of each kind (colour, shape, yes/no)."""
    rows = mmmu_rows("test", seed)
    random.Random(seed).shuffle(rows)
    return [r for kind in ("colour", "shape", "yes/no") for r in [r for r in rows if r["subfield"] == kind][:per_kind]]


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


def text_ppl_check(vlm_dir: Path, data_dir, windows: int, device: str, max_ratio: float) -> dict:
    """WikiText-2 perplexity (512-token windows) of SmolLM2 and of the saved VLM's language model: within
    ``max_ratio``, or the VLM is no longer SmolLM2 inside (and compressing it would not be compressing
    SmolLM2)."""
    cfg = EvalConfig(tasks=("wikitext2",), seqlen=512, max_windows=windows, data_dir=data_dir, device=device,
                     progress=False)
    scores = {name: evaluate(name, cfg)["wikitext2_ppl"]["ppl"] for name in (BASE, str(vlm_dir))}
    smollm2, vlm = scores[BASE], scores[str(vlm_dir)]
    if vlm > smollm2 * max_ratio:
        raise SystemExit(f"error: the VLM's text perplexity {vlm:.4f} exceeds SmolLM2's {smollm2:.4f} by more than "
                         f"x{max_ratio}: lower --lm-lora-rank, --steps or --lr")
    return {"smollm2": smollm2, "vlm": vlm, "ratio": round(vlm / smollm2, 4), "max_ratio": max_ratio,
            "windows": windows, "seqlen": 512}


def timed(seconds: dict, name: str, fn, *args):
    """``fn(*args)``, its wall seconds recorded under ``name``."""
    start = time.perf_counter()
    out = fn(*args)
    seconds[name] = round(time.perf_counter() - start, 1)
    return out


def build(args) -> tuple[object, object, dict]:
    """(model, processor, report) of the three stages and the test, every stage timed."""
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    seconds: dict[str, float] = {}
    model, processor = build_vlm(args.seed, args.patch, args.tower_width, args.tower_layers)
    model.to(device)
    train = timed(seconds, "load_images", labelled_images, processor, "train", device)
    print("stage 1: the tower learns colour and shape", flush=True)
    tower = timed(seconds, "tower", train_tower, model, train, args.tower_epochs, 64, args.tower_lr, args.seed, device)
    heads = tower.pop("heads")
    tower["test_accuracy"] = tower_accuracy(model, heads, labelled_images(processor, "test", device), device)
    print(f"  tower test accuracy {tower['test_accuracy']}", flush=True)
    print("stage 2: the projector writes colour and shape words", flush=True)
    projector = timed(seconds, "projector", train_projector, model, processor, train, args.projector_epochs, 64,
                      args.projector_lr, args.seed, device)
    print("stage 3: end to end, the projector and LoRA on the LM", flush=True)
    end_to_end = timed(seconds, "end_to_end", train_end_to_end, model, processor, mmmu_rows("train", args.seed),
                       args.steps, args.batch_size, args.lr, args.seed, args.lm_lora_rank)
    test = timed(seconds, "test", accuracy, model, processor, test_sample(args.seed, args.per_kind), args.batch_size)
    report = {"base": BASE, "vision": model.config.vision_config.to_diff_dict(),
              "image_tokens": (IMAGE_SIZE // args.patch) ** 2, "seed": args.seed, "device": device,
              "threads": torch.get_num_threads(), "autocast_bf16": bf16_native(device), "tower": tower, "projector": projector, "end_to_end": end_to_end,
              "test": test, "seconds": seconds}
    return model, processor, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=cache_dir() / "models" / "llava-smollm2-easyvqa")
    parser.add_argument("--patch", type=int, default=16, help="the tower's patch size in pixels (64x64 images)")
    parser.add_argument("--tower-width", type=int, default=256, help="the tower's hidden size")
    parser.add_argument("--tower-layers", type=int, default=4, help="the tower's layers")
    parser.add_argument("--tower-epochs", type=int, default=20,
                        help="stage 1: passes over the 4,000 train images (6 left shape at 0.59, 20 reach 0.966)")
    parser.add_argument("--tower-lr", type=float, default=1e-3)
    parser.add_argument("--projector-epochs", type=int, default=20, help="stage 2: passes over the train images")
    parser.add_argument("--projector-lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=150, help="stage 3: end-to-end steps through the LM")
    parser.add_argument("--batch-size", type=int, default=16, help="stage 3's questions a step, and the test's")
    parser.add_argument("--lr", type=float, default=3e-4, help="stage 3's learning rate")
    parser.add_argument("--lm-lora-rank", type=int, default=8,
                        help="stage 3's LoRA rank on the language model (0: frozen LM), merged after; the "
                             "text check bounds its change to WikiText-2 perplexity")
    parser.add_argument("--max-ppl-ratio", type=float, default=1.05,
                        help="the most the VLM's WikiText-2 perplexity may exceed SmolLM2's")
    parser.add_argument("--per-kind", type=int, default=300, help="test questions of each kind (a seeded sample)")
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
        start = time.perf_counter()
        model, processor, report = build(args)
        with atomic_output_dir(args.out) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
        report["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "force", "data_dir")}
        report["text_ppl"] = text_ppl_check(args.out, args.data_dir, args.ppl_windows, report["device"],
                                            args.max_ppl_ratio)
        report["build_seconds"] = round(time.perf_counter() - start, 1)
    except UserError as exc:
        sys.exit(f"error: {exc}")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
