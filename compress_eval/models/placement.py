"""``--offload auto``: where a run keeps its weights, decided from the model's size (its config alone,
on the meta device) and the memory free on the device and the host."""

from __future__ import annotations

import torch

from compress_eval.errors import UserError
from compress_eval.models.offload import MODES
from compress_eval.models.registry import local_path_or_id, resolve

# Room kept free beside the weights: allocator slack, the CUDA context, the OS (a share of what is free).
HEADROOM = 0.10


def host_free_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be had without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def device_free_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return host_free_bytes()


def meta_model(where: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of a directory or Hub id on the meta device: every shape, no storage."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from compress_eval.models.loading import auto_model_class

    config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        return auto_model_class(where, trust_remote_code).from_config(config, trust_remote_code=trust_remote_code)


def choose_offload(weight_bytes: int, activation_bytes: int, device_free: int, host_free: int,
                   device_type: str) -> tuple[str, str]:
    """(mode, reason): ``none`` when weights and activations fit the device, else ``cpu`` when the
    weights fit the host beside a device (a GPU), else ``disk``."""
    gb = 1e9
    need = weight_bytes + activation_bytes
    if need <= (1 - HEADROOM) * device_free:
        return "none", f"model {weight_bytes / gb:.1f} GB + activations {activation_bytes / gb:.1f} GB fit " \
                       f"the {device_free / gb:.1f} GB free on the {device_type} device"
    if device_type == "cuda" and weight_bytes <= (1 - HEADROOM) * host_free:
        return "cpu", f"model {weight_bytes / gb:.1f} GB does not fit the {device_free / gb:.1f} GB free on " \
                      f"the GPU but fits the {host_free / gb:.1f} GB free on the host"
    return "disk", f"model {weight_bytes / gb:.1f} GB + activations {activation_bytes / gb:.1f} GB do not fit " \
                   f"the {device_free / gb:.1f} GB free on the {device_type} device" + \
                   ("" if device_type == "cpu" else f" nor the {host_free / gb:.1f} GB on the host")


def resolve_offload(mode: str, name: str, device: str, dtype, tokens: int, trust_remote_code: bool = False,
                    log=print) -> str:
    """The offload mode to use: ``mode`` itself, or for ``auto`` :func:`choose_offload` for the model
    (its config read, no weights) with the hidden states of ``tokens`` at every block as activations.
    The choice and its reason are logged."""
    from compress_eval.models.adapters import get_adapter
    from compress_eval.models.loading import parse_dtype

    if mode not in MODES:
        raise UserError(f"unknown --offload {mode!r}: use {', '.join(MODES)}")
    if mode != "auto":
        if mode != "none":
            log(f"offload: {mode} (as asked)")
        return mode
    try:
        model = meta_model(local_path_or_id(resolve(name)), trust_remote_code)
    except (OSError, ValueError) as exc:  # loading reports it in full
        log(f"offload: none (the model's config cannot be read: {str(exc).splitlines()[0]})")
        return "none"
    itemsize = (dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)).itemsize
    weights = sum(p.numel() for p in model.parameters()) * itemsize
    text = get_adapter(model).text_config
    activations = (text.num_hidden_layers + 1) * tokens * text.hidden_size * itemsize
    chosen, reason = choose_offload(weights, activations, device_free_bytes(device), host_free_bytes(),
                                    torch.device(device).type)
    log(f"offload: {chosen} ({reason})")
    return chosen
