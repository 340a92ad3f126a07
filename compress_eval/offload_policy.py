"""The offload policy: where the weights wait while other blocks run (``--offload auto``'s rule), and how a
run says where."""

from __future__ import annotations

import logging
from typing import NamedTuple

from compress_eval.memory_model import GB, HEADROOM

log = logging.getLogger(__name__)

# Every row of bench/results/plan_accuracy.md is within this fraction of the measured peak: a forced
# --offload none is refused only when the plan's peak, lowered by it, still exceeds the memory.
PLAN_ERROR = 0.20
NO_MEMORY_CHECK = "COMPRESS_EVAL_NO_MEMORY_CHECK"  # set: a forced --offload none runs whatever the plan says


class OffloadChoice(NamedTuple):
    """``--offload auto``'s answer: the mode and a sentence for the log (unpacks as (mode, reason))."""

    mode: str
    reason: str


def choose_offload(weight_bytes: int, activation_bytes: int, device_free: int, host_free: int,
                   device_type: str) -> OffloadChoice:
    """What ``--offload auto`` does: ``none`` when weights and activations fit the device, else ``cpu``
    when a GPU's weights fit the host (there they wait beside it), else ``disk``.

    ``device_free`` / ``host_free`` are the bytes free for the run (``HEADROOM`` is kept back here);
    ``activation_bytes`` is the run's peak beside its weights on the device. On a CPU device the host
    is the device, so ``cpu`` would gain nothing: it is ``none`` or ``disk``. Pure: no measurement.
    """
    gb = GB
    need = weight_bytes + activation_bytes
    if need <= (1 - HEADROOM) * device_free:
        return OffloadChoice("none", f"model {weight_bytes / gb:.1f} GB + activations {activation_bytes / gb:.1f} GB "
                                     f"fit the {device_free / gb:.1f} GB free on the {device_type} device")
    if device_type == "cuda" and weight_bytes <= (1 - HEADROOM) * host_free:
        return OffloadChoice("cpu", f"model {weight_bytes / gb:.1f} GB + activations {activation_bytes / gb:.1f} GB "
                                    f"do not fit the {device_free / gb:.1f} GB free on the GPU; the weights fit "
                                    f"the {host_free / gb:.1f} GB free on the host")
    where = "" if device_type != "cuda" else f" nor the weights the {host_free / gb:.1f} GB on the host"
    return OffloadChoice("disk", f"model {weight_bytes / gb:.1f} GB + activations {activation_bytes / gb:.1f} GB "
                                 f"do not fit the {device_free / gb:.1f} GB free on the {device_type} device{where}")


def say_offload(mode: str, reason: str) -> None:
    """An offloaded run says so (it is slower, and uses the disk or host memory); the ordinary case, the
    model in memory, goes to the log file only."""
    log.log(logging.INFO if mode != "none" else logging.DEBUG, "offload: %s (%s)", mode, reason)
