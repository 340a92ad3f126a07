"""Recovery fine-tune after compression: full, LoRA, or QLoRA (nf4 base), on calibration windows or
the train split, by next-token loss or by distillation of the uncompressed model's logits.

A plain function over (model, token windows, options) so every method that removes or ties
parameters can heal with the same fine-tune (FF merging, drop-window). Tied modules need nothing
special: a module shared by several layers is one set of Parameters, so autograd sums the gradients
of every layer that uses it, and peft wraps the shared linears once (``named_modules`` de-duplicates),
so their LoRA factors are shared too.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path

import torch
from torch import nn

from compress_eval import distributed
from compress_eval.config import RecoveryOptions
from compress_eval.errors import UserError
from compress_eval.methods.finite import require_finite
from compress_eval.methods.recovery_state import FineTuneState, digest, model_digest
from compress_eval.models.adapters import from_out_in, is_conv1d, is_linear, out_in, vision_modules
from compress_eval.progress import bar
from compress_eval.quantize import check_trainable

log = logging.getLogger(__name__)

# Paper defaults: lr 5e-5 for full fine-tunes (GPT-2, ViT, MT), 5e-4 for (Q)LoRA (OLMo-7B).
DEFAULT_LR = {"full": 5e-5, "lora": 5e-4, "qlora": 5e-4}


def training_sequences(windows: torch.Tensor, seqlen: int | None) -> torch.Tensor:
    """Cut (n, L) windows into (m, seqlen) sequences (the tail of each window is dropped)."""
    seqlen = seqlen or windows.size(1)
    if seqlen > windows.size(1):
        raise UserError(f"--recover-seqlen {seqlen} exceeds the calibration windows ({windows.size(1)} tokens): "
                        f"lower it or raise --seqlen")
    per = windows.size(1) // seqlen
    return windows[:, : per * seqlen].reshape(-1, seqlen)


def inverse_sqrt_schedule(step: int, warmup: int) -> float:
    """Linear warm-up to 1, then 1/sqrt decay (the paper's inv_sqrt schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return math.sqrt(max(warmup, 1) / (step + 1))


def cosine_schedule(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def kl_of_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(p_teacher || p_student) over the vocabulary, in fp32: the distillation
    loss of the recovery stage and of FuseGPT's kd-logits group fine-tune."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def recovery_loss(model: nn.Module, teacher: nn.Module | None, ids: torch.Tensor,
                  options: RecoveryOptions) -> torch.Tensor:
    """The loss of one batch: next-token CE, KL to the teacher's logits, or (1 - w) CE + w KL. The mix
    keeps the teacher's general distribution (kd alone kept C4) while the text still pulls the model
    towards its own next tokens (ce alone healed WikiText-2 most; bench/results/quality_smollm2.md)."""
    if options.recover_loss == "ce":
        return model(input_ids=ids, labels=ids, use_cache=False).loss
    with torch.no_grad():
        target = teacher(input_ids=ids, use_cache=False).logits
    if options.recover_loss == "kd":
        return kl_of_logits(model(input_ids=ids, use_cache=False).logits, target)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    w = options.recover_kd_weight
    return (1 - w) * out.loss + w * kl_of_logits(out.logits, target)


def to_nf4_(model: nn.Module, skip: tuple[nn.Module, ...] = ()) -> int:
    """Replace every linear (GPT-2's Conv1D too; not ``skip``) by a bitsandbytes Linear4bit in
    place, with the QLoRA settings of the quantization stage's ``bnb_config("nf4", double_quant)``.
    As in that stage, a linear whose shape the 4-bit kernels refuse (``four_bit_refusal``) stays float.

    In place rather than the stage's save-and-reload, so modules shared by a tie stay one module
    and each is quantized once. Returns the number of linears converted.
    """
    import bitsandbytes as bnb

    from compress_eval.quantize import bnb_config, four_bit_refusal

    config = bnb_config("nf4", double_quant=True, model_dtype=next(model.parameters()).dtype)
    count, refused = 0, []
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not is_linear(child) or child in skip:
                continue
            conv1d = is_conv1d(child)
            weight = out_in(child.weight.data, conv1d)
            if (reason := four_bit_refusal(weight.size(1), weight.size(0))) is not None:
                refused.append(f"{name}.{child_name}: {reason}".lstrip("."))
                continue
            q = bnb.nn.Linear4bit(weight.size(1), weight.size(0), bias=child.bias is not None,
                                  compute_dtype=config.bnb_4bit_compute_dtype,
                                  quant_type=config.bnb_4bit_quant_type,
                                  compress_statistics=config.bnb_4bit_use_double_quant, device="meta")
            q.weight = bnb.nn.Params4bit(weight.contiguous().to("cpu"), requires_grad=False,
                                         quant_type=config.bnb_4bit_quant_type,
                                         compress_statistics=config.bnb_4bit_use_double_quant)
            q.was_conv1d = conv1d
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, child_name, q.to(child.weight.device))
            count += 1
    if refused and not count:
        raise UserError(f"--recover qlora: no linear of this model fits bitsandbytes' 4-bit kernels "
                        f"(e.g. {refused[0]}); use --recover lora")
    return count


def merge_lora_(model: nn.Module) -> None:
    """Fold every LoRA layer into a plain ``nn.Linear`` (dequantizing an nf4 base first), in place.

    For QLoRA the result is dequant(nf4 W) + scale * B A: exactly the function that was trained.
    """
    from peft.tuners.lora import LoraLayer

    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, LoraLayer):
                continue
            base = child.get_base_layer()
            weight = _dense_weight(base)
            for adapter_name in child.active_adapters:
                weight = weight + child.get_delta_weight(adapter_name).to(weight)
            if _is_4bit(base):
                dense = _dense_module(base, weight)
            else:  # nn.Linear, or GPT-2's Conv1D (peft's delta is then already in its (in, out) layout)
                dense = base
                dense.weight.data.copy_(weight)
            setattr(parent, child_name, dense)


def _dense_module(base: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A plain module of the family's own type (Linear, or GPT-2's Conv1D) holding ``weight`` (out, in)."""
    if base.was_conv1d:
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(base.out_features, base.in_features).to(weight)
    else:
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None).to(weight)
    dense.weight.data.copy_(from_out_in(weight, base.was_conv1d))
    if base.bias is not None:
        dense.bias.data.copy_(base.bias.data)
    return dense


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def _dense_weight(module: nn.Module) -> torch.Tensor:
    if _is_4bit(module):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(module.weight.data, module.weight.quant_state).to(module.compute_dtype)
    return module.weight.data


def fine_tune(model: nn.Module, windows: torch.Tensor, options: RecoveryOptions, seed: int = 0,
              teacher: nn.Module | None = None, autosave: Path | None = None) -> dict:
    """Fine-tune of ``model`` in place on ``windows`` by ``options.recover_loss`` (``teacher`` gives the
    logits kd and ce+kd learn); returns a summary for the manifest. It saves its progress in
    ``options.recover_resume``, else in ``autosave`` (a batch's), to continue from there when run again.

    Every step checks the loss and the trainable weights (all of them for ``full``: a float32 sum per
    tensor, ~16 ms against a ~5 s SmolLM2-135M step on CPU) and stops at the first NaN/inf with a
    :class:`UserError`."""
    if options.recover == "none":
        return {}
    mode = options.recover
    check_trainable(model, mode)
    lr = options.recover_lr or DEFAULT_LR[mode]
    sequences = training_sequences(windows, options.recover_seqlen)
    device = next(model.parameters()).device
    start = time.perf_counter()
    store = _resume_store(model, sequences, options, seed, autosave)
    trainable = _prepare(model, options)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=options.recover_weight_decay)
    warmup = max(1, round(options.recover_steps * options.recover_warmup))
    factor = ((lambda s: cosine_schedule(s, warmup, options.recover_steps)) if options.recover_schedule == "cosine"
              else (lambda s: inverse_sqrt_schedule(s, warmup)))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(sequences.size(0), generator=generator)
    local = distributed.shard(sequences)  # data parallel: each process runs its members of every batch
    losses, first = [], 0
    if store and (saved := store.load()):
        store.restore(saved, named, optimizer, schedule)
        losses, first = list(saved["losses"]), saved["step"]
        log.info("recovery %s resumes from %s after %d of %d steps", mode, store.dir, first, options.recover_steps)
    was_training = model.training
    model.train()
    steps = bar(range(first, options.recover_steps), f"recovery {mode}", total=options.recover_steps, unit="step",
                initial=first)
    try:
        for step in steps:
            idx = torch.tensor([int(order[(step * options.recover_batch_size + j) % len(order)])
                                for j in range(options.recover_batch_size)])
            mine = distributed.local_positions(idx)  # the whole batch in one process
            value = 0.0
            if mine.numel():
                ids = local[mine].to(device)
                loss = recovery_loss(model, teacher, ids, options)
                loss.backward()
                value = loss.item() * (mine.numel() / idx.numel())
            distributed.reduce_gradients(trainable, mine.numel(), idx.numel())
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            value = distributed.all_sum(value)
            require_finite(value, trainable, f"recovery {mode} step {step + 1}/{options.recover_steps}",
                           {"--recover-lr": lr})
            losses.append(round(value, 4))
            steps.set_postfix(loss=losses[-1], refresh=False)
            if (step + 1) % max(1, options.recover_steps // 5) == 0:
                log.debug("recovery %s step %d/%d loss %s", mode, step + 1, options.recover_steps, losses[-1])
            if store and ((step + 1) % options.recover_save_every == 0 or step + 1 == options.recover_steps):
                store.save(step + 1, losses, named, optimizer, schedule)
    finally:
        steps.close()  # now, not when the traceback of an error goes: the error line after the bar
        model.train(was_training)
    if mode in ("lora", "qlora"):
        merge_lora_(model)
        if hasattr(model, "peft_config"):  # left by peft's injection; the model is plain again
            del model.peft_config
    for p in model.parameters():
        p.requires_grad_(False)
    return {"mode": mode, "steps": options.recover_steps, "lr": lr, "schedule": options.recover_schedule,
            "loss": options.recover_loss,
            **({"kd_weight": options.recover_kd_weight} if options.recover_loss == "ce+kd" else {}),
            "data": options.recover_data, "sequences": sequences.size(0),
            "seqlen": sequences.size(1),
            "batch_size": options.recover_batch_size, "trainable_params": n_trainable,
            "loss_first": losses[0], "loss_last": losses[-1], "losses": losses,
            **({"resumed_at_step": first} if first else {}),
            "seconds": round(time.perf_counter() - start, 2)}


def _resume_store(model: nn.Module, sequences: torch.Tensor, options: RecoveryOptions, seed: int,
                  autosave: Path | None) -> FineTuneState | None:
    """This fine-tune's saved state, fingerprinted by its starting weights, its data and every setting that
    changes the result (not where or how often it is saved): in the user's ``recover_resume`` (another
    run's state there is refused), else in ``autosave`` (where it is replaced); one process only."""
    if options.recover_resume is None and (autosave is None or distributed.world_size() > 1):
        return None
    if distributed.world_size() > 1:
        raise UserError("--recover-resume saves one process's fine-tune: run it in one process, or drop it")
    settings = options.model_dump(exclude={"recover_resume", "recover_save_every"})
    fingerprint = {"settings": settings, "seed": seed, "data": digest(sequences), "model": model_digest(model)}
    if options.recover_resume is not None:
        return FineTuneState(options.recover_resume, fingerprint)
    return FineTuneState(autosave, fingerprint, replace_other=True)


def _prepare(model: nn.Module, options: RecoveryOptions) -> list[nn.Parameter]:
    """Make the parameters to train trainable (and only those); for (Q)LoRA inject the adapters. A VLM's
    vision tower and projector get no adapter and stay float (text calibration never reaches them)."""
    for p in model.parameters():
        p.requires_grad_(options.recover == "full")
    if options.recover == "full":
        return [p for p in model.parameters()]
    from peft import LoraConfig, inject_adapter_in_model

    vision = vision_modules(model)
    if options.recover == "qlora":
        kept = (m for path in vision for m in model.get_submodule(path).modules())
        to_nf4_(model, skip=(model.get_output_embeddings(), *kept))
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=_linear_names(model), bias="none",
                        exclude_modules="|".join(rf"{re.escape(path)}\..*" for path in vision) or None)
    inject_adapter_in_model(config, model)
    trainable = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


def _linear_names(model: nn.Module) -> list[str]:
    """Leaf names of every linear but the LM head (peft's "all-linear", also for GPT-2's Conv1D)."""
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is not head and (is_linear(module) or _is_4bit(module)):
            names.add(name.rpartition(".")[2])
    return sorted(names)
