"""Methods by name. Each module of ``compress_eval.methods`` registers its classes with
:func:`register_method`; the modules are discovered and imported on first lookup, so a new method
is one new file."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from pathlib import Path

from pydantic import ValidationError

from compress_eval.config import CompressConfig, MethodStage, validation_message
from compress_eval.errors import UserError
from compress_eval.methods.base import Compressor

_REGISTRY: dict[str, type[Compressor]] = {}


def register_method(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator; a second method under the same name is a programming error."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    import compress_eval.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def available_methods() -> dict[str, type[Compressor]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def method_class(name: str) -> type[Compressor]:
    methods = available_methods()
    if name not in methods:
        close = difflib.get_close_matches(name, list(methods), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown method {name!r}{hint}: choose one of {', '.join(methods)}")
    return methods[name]


def _resolve_one(cfg: CompressConfig) -> CompressConfig:
    try:
        cls = method_class(cfg.method)
        cfg = cls.resolved_config(cfg)
    except (UserError, ValidationError):
        return cfg
    if cls.default_amount and not cls.given_amount(cfg):
        update = dict(cls.default_amount)
        if "options" in update:
            update["options"] = {**cfg.options, **update["options"]}
        cfg = cfg.model_copy(update=update)
    return cfg


def resolve_config(cfg: CompressConfig) -> CompressConfig:
    """The config a run uses and records: the method's own defaults (profiles, default amounts) filled
    in, as a new config; done once, before anything hashes or runs it. With stages, each method stage
    is resolved, and the first whose profile sets the calibration size sets it for the run (calibration
    is shared). Invalid methods or options are left for :func:`get_method` to report."""
    if cfg.stages is None:
        return _resolve_one(cfg)
    stages = []
    for stage in cfg.stages:
        if isinstance(stage, MethodStage):
            one = _resolve_one(cfg.stage_config(stage))
            calibration = {k: getattr(one, k) for k in ("calib_samples", "seqlen") if getattr(one, k) != getattr(cfg, k)}
            cfg = cfg.model_copy(update=calibration)
            stage = MethodStage(method=one.method, options=one.options, **one.amount())
        stages.append(stage)
    return cfg.model_copy(update={"stages": stages})


def defaulted_amount(cfg: CompressConfig) -> str | None:
    """'sparsity=0.25' when ``cfg`` gives no amount and resolving it takes the method's default (with
    stages: each such stage, named), else None."""
    method_stages = [s for s in cfg.stage_list() if isinstance(s, MethodStage)]
    said = []
    for stage in method_stages:
        one = cfg.stage_config(stage) if cfg.stages is not None else cfg
        cls = available_methods().get(one.method)
        if cls is None or not cls.default_amount or cls.given_amount(one):
            continue
        parts = []
        for key, value in cls.default_amount.items():
            for k, v in (value.items() if key == "options" else [(key, value)]):
                parts.append(f"{k}={round(v, 4) if isinstance(v, float) else v}")
        said.append(", ".join(parts) + (f" for {one.method}" if len(method_stages) > 1 else ""))
    return "; ".join(said) or None


def run_name(cfg: CompressConfig) -> str:
    """MODEL-METHOD-AMOUNT-sSEED, the directory ``compress`` writes without --out, for a resolved config (the
    amount as given, or the method's default; several stages: METHOD-AMOUNT of each, joined by +)."""
    named = "+".join(f"{s.method}-{method_class(s.method).run_label(s)}" for s in cfg.stage_list()
                     if isinstance(s, MethodStage))
    return f"{Path(cfg.model).name}-{named or cfg.method}-s{cfg.seed}"


def stage_methods(cfg: CompressConfig) -> list[Compressor | None]:
    """One method instance per stage of a (resolved) config (None for recover and quantize stages),
    validated before any heavy work. A method that ties modules across blocks must be the last
    method: a later one would renumber the tied blocks or change every copy at once."""
    stages = cfg.stage_list()
    methods = [get_method(cfg.stage_config(s) if cfg.stages is not None else cfg) if isinstance(s, MethodStage)
               else None for s in stages]
    named = [m for m in methods if m is not None]
    for earlier in named[:-1]:
        if earlier.ties_modules:
            raise UserError(f"stage {earlier.name!r} ties modules across blocks, so it must be the last method "
                            f"stage (a later one would renumber or change the tied blocks): move it after "
                            f"{named[-1].name!r}")
    return methods


def get_method(cfg: CompressConfig) -> Compressor:
    """The method instance for a (resolved) config, with its options validated."""
    cls = method_class(cfg.method)
    if cfg.blocks is not None and not cls.takes_blocks:
        raise UserError(f"--blocks names the blocks of method 'drop'; {cfg.method!r} chooses its own: "
                        f"give it --num-blocks N or --sparsity S instead (or use --method drop)")
    try:
        return cls(cfg)
    except ValidationError as exc:
        raise UserError(f"invalid options for method {cfg.method!r}: {validation_message(exc)}") from exc
