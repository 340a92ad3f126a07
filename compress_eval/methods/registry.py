"""Methods by name. Each module of ``compress_eval.methods`` registers its classes with
:func:`register_method`; the modules are discovered and imported on first lookup, so a new method
is one new file."""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from pydantic import ValidationError

from compress_eval.config import CompressConfig, validation_message
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


def resolve_config(cfg: CompressConfig) -> CompressConfig:
    """The config a run uses and records: the method's own defaults (profiles) filled in, as a new
    config; done once, before anything hashes or runs it. Invalid methods or options are left for
    :func:`get_method` to report."""
    try:
        cls = method_class(cfg.method)
        cfg = cls.resolved_config(cfg)
    except (UserError, ValidationError):
        return cfg
    if cls.default_amount and not cls.amount_given(cfg):
        update = dict(cls.default_amount)
        if "options" in update:
            update["options"] = {**cfg.options, **update["options"]}
        cfg = cfg.model_copy(update=update)
    return cfg


def defaulted_amount(cfg: CompressConfig) -> str | None:
    """'sparsity=0.25' when ``cfg`` gives no amount and resolving it takes the method's default, else None."""
    cls = available_methods().get(cfg.method)
    if cls is None or not cls.default_amount or cls.amount_given(cfg):
        return None
    parts = []
    for key, value in cls.default_amount.items():
        for k, v in (value.items() if key == "options" else [(key, value)]):
            parts.append(f"{k}={round(v, 4) if isinstance(v, float) else v}")
    return ", ".join(parts)


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
