"""Image-text calibration (``--calib-data easy-vqa``): a vision-language model's language model sees image
tokens in use, so its blocks may be scored on what it sees then rather than on text alone.

The windows are packed chat sequences (an image, its easy-vqa question in lm-eval's MMMU prompt, the
answer letter), token ids like any other calibration, so every method takes them unchanged. What the
language model receives at an image token is not that token's embedding but the projected image
feature the whole VLM puts there: it is computed once per sequence (the vision tower and projector are
never compressed), and while the methods run a hook on the input embeddings writes it back at the image
positions of any calibration window that passes.
"""

from __future__ import annotations

import io
import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from compress_eval.errors import UserError
from compress_eval.models.adapters import embed_inputs, get_adapter, is_multimodal
from compress_eval.models.offload import execution_device

log = logging.getLogger(__name__)

IMAGE_TEXT = ("easy-vqa",)  # the --calib-data corpora of image-text pairs


def chat_prompt(processor, text: str) -> str:
    """The prompt lm-eval's hf-multimodal gives a question under --apply_chat_template: one user turn
    whose ``<image>`` placeholders become image parts, then the assistant's turn."""
    parts = text.split("<image>")
    content = []
    for i, part in enumerate(parts):
        if part:
            content.append({"type": "text", "text": part})
        if i < len(parts) - 1:
            content.append({"type": "image"})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def question_image(row: dict):
    """The image of an MMMU-schema row (easy-vqa has one per question), as RGB."""
    from PIL import Image

    return Image.open(io.BytesIO(row["image_1"]["bytes"])).convert("RGB")


@dataclass
class ImageCalibration:
    """Calibration windows of image-text sequences and, per window, the language model's inputs at its
    image tokens (keyed by the window's token ids: the methods pass windows, never their indices)."""

    ids: torch.Tensor  # (nsamples, seqlen)
    image_token: int
    features: dict[bytes, torch.Tensor]  # window ids -> (its image tokens, hidden)


def window_key(ids: torch.Tensor) -> bytes:
    return ids.detach().to("cpu", torch.int64).numpy().tobytes()


def image_token_id(model) -> int:
    token = getattr(model.config, "image_token_id", None)
    return token if token is not None else model.config.image_token_index


def sequence_inputs(adapter, processor, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, the hidden state entering the first block) of one question through the whole VLM: the
    prompt, then the answer letter and the end of the turn."""
    from lm_eval.tasks.mmmu.utils import doc_to_text

    tokenizer = processor.tokenizer
    enc = processor(images=[question_image(row)], text=[chat_prompt(processor, doc_to_text(row))],
                    return_tensors="pt")
    target = tokenizer(row["answer"] + tokenizer.eos_token, add_special_tokens=False, return_tensors="pt")
    device = execution_device(adapter.model)  # an offloaded model's own .device is meta
    ids = torch.cat([enc.pop("input_ids"), target.input_ids], dim=1).to(device)
    enc["attention_mask"] = torch.ones_like(ids)
    hidden = embed_inputs(adapter, ids, **{k: v.to(device) for k, v in enc.items()})
    return ids[0].cpu(), hidden[0]


def image_text_windows(model, processor, dataset: str, nsamples: int, seqlen: int, seed: int = 0) -> ImageCalibration:
    """``nsamples`` windows of ``seqlen`` tokens, packed from seeded easy-vqa train questions (the last
    one of a window cut where the window ends)."""
    from compress_eval.data.easy_vqa import mmmu_rows

    if not is_multimodal(getattr(model.config, "model_type", None)):
        raise UserError(f"--calib-data {dataset} is image-text calibration, for vision-language models; this is a "
                        f"text model: use --calib-data wikitext2 or c4")
    if processor is None:
        raise UserError(f"--calib-data {dataset} needs the model's processor to read images and it has none "
                        f"(see the warning above): save the processor beside the model, or use --calib-data "
                        f"wikitext2")
    token, adapter = image_token_id(model), get_adapter(model)
    rows = mmmu_rows("train", seed)
    random.Random(seed).shuffle(rows)
    rows = iter(rows)
    ids, features = [], {}
    for _ in range(nsamples):
        window_ids, window_embeds, length = [], [], 0
        while length < seqlen:
            try:
                seq_ids, seq_embeds = sequence_inputs(adapter, processor, next(rows))
            except StopIteration:
                raise UserError(f"easy-vqa's train split holds fewer than {nsamples} x {seqlen} tokens: lower "
                                f"--calib-samples or --seqlen") from None
            take = min(seqlen - length, seq_ids.numel())
            window_ids.append(seq_ids[:take])
            window_embeds.append(seq_embeds[:take])
            length += take
        row_ids, embeds = torch.cat(window_ids), torch.cat(window_embeds)
        ids.append(row_ids)
        features[window_key(row_ids)] = embeds[row_ids.to(embeds.device) == token].cpu()
    calib = torch.stack(ids)
    log.debug("image-text calibration: %d windows, %d image tokens", len(ids),
              sum(f.shape[0] for f in features.values()))
    return ImageCalibration(calib, token, features)


@contextmanager
def images_in_embeddings(calib: ImageCalibration | None, *models):
    """While it is open, the input embeddings of a calibration window carry its image features at its
    image tokens, as the whole VLM would give them to its language model (in each of ``models``: the
    one compressed, and a distillation teacher)."""
    models = [m for m in models if m is not None]
    if calib is None or not models:
        yield
        return

    def put_images(module, args, output):
        ids = args[0]
        if not (ids == calib.image_token).any():
            return output
        output = output.clone()
        for b in range(ids.shape[0]):
            mask = ids[b] == calib.image_token
            if mask.any():
                found = calib.features.get(window_key(ids[b]))
                if found is None:
                    raise RuntimeError("image tokens in a sequence that is not a calibration window")
                output[b, mask] = found.to(output.device, output.dtype)
        return output

    handles = [m.get_input_embeddings().register_forward_hook(put_images) for m in models]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
