"""Run configuration: what to compress, how, and with which calibration data; YAML recipes.

Method-specific knobs live in each method's own pydantic model (defaults from its paper) and are
validated from ``options``; this keeps one recipe shape for every method.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from compress_eval.errors import UserError


class MethodOptions(BaseModel):
    """Base of every method's own options; unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class RecoveryOptions(MethodOptions):
    """The recovery stage after any method (``--recover lora --recover-steps 200``): a fine-tune of the
    compressed model on the calibration windows, before quantization."""

    recover: Literal["none", "full", "lora", "qlora"] = Field(
        "none", description="fine-tune after compressing: none, full, lora, or qlora (nf4 base + LoRA)")
    recover_steps: int = Field(100, ge=1, description="optimizer steps")
    recover_lr: float | None = Field(None, gt=0, le=1e30,
                                     description="peak learning rate (default 5e-5 full, 5e-4 LoRA)")
    recover_seqlen: int | None = Field(None, ge=2,
                                       description="tokens per training sequence (default: calibration seqlen)")
    recover_batch_size: int = Field(1, ge=1, description="sequences per step")
    recover_weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    recover_warmup: float = Field(0.01, ge=0, lt=1, description="warm-up fraction of the steps (then the schedule)")
    recover_schedule: Literal["inv-sqrt", "cosine"] = Field(
        "inv-sqrt", description="after warm-up: 1/sqrt decay (the FF-merging paper) or cosine to 0")
    recover_data: Literal["calibration", "train", "wikitext2", "c4", "c4+wikitext2"] = Field(
        "calibration", description="training text: the calibration windows, or consecutive sequences (steps x "
                                   "batch of them, disjoint from evaluation) of a train split: the calibration "
                                   "corpus' (train; for easy-vqa, image-text questions of its train split), "
                                   "WikiText-2's (offline its tokenized train file), C4's (offline the documents "
                                   "after the 1100 that perplexity reads), or both alternating, half each "
                                   "(c4+wikitext2)")
    recover_loss: Literal["ce", "kd", "ce+kd"] = Field(
        "ce", description="next-token cross-entropy, KL divergence to the uncompressed model's logits (kd; for a "
              "compressed checkpoint, its base model's), or both weighed by recover_kd_weight (ce+kd)")
    recover_kd_weight: float = Field(0.5, gt=0, lt=1, description="ce+kd only: the loss is (1 - w) CE + w KL")
    recover_resume: str | None = Field(
        None, description="state directory: the fine-tune is saved there every recover_save_every steps, and a "
                          "re-run with the same model, data and settings continues from it (same weights)")
    recover_save_every: int = Field(50, ge=1, description="recover_resume only: steps between saves")
    lora_r: int = Field(8, ge=1, description="LoRA rank (lora / qlora recovery; all linears but the LM head)")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (scale alpha / r)")
    lora_dropout: float = Field(0.2, ge=0, lt=1, description="LoRA dropout")

    @model_validator(mode="after")
    def _kd_weight_needs_mixed_loss(self):
        # By value, not by what was set: a recipe written out (dump_recipe) holds every field.
        default = type(self).model_fields["recover_kd_weight"].default
        if self.recover_kd_weight != default and self.recover_loss != "ce+kd":
            raise ValueError(f"recover_kd_weight weighs the two terms of recover_loss ce+kd, not of "
                             f"{self.recover_loss}: give --recover-loss ce+kd, or drop the weight")
        return self

    @property
    def distils(self) -> bool:
        """Whether the loss reads the uncompressed model's logits, which then has to be loaded beside."""
        return self.recover_loss != "ce"


AMOUNT_PREFIX = {"sparsity": "s", "num_blocks": "n", "param_sparsity": "p"}


class Amount(MethodOptions):
    """How much a method removes: one of a fraction of the blocks, a number of them, which, or a fraction
    of the decoder's parameters (so that methods that remove blocks and methods that remove parts of
    blocks compare at one size)."""

    sparsity: float | None = Field(None, description="fraction of blocks to remove, rounded up")
    param_sparsity: float | None = Field(None, description="fraction of the decoder blocks' parameters to "
                                                           "remove (at least; block methods round up to blocks)")
    num_blocks: int | None = Field(None, description="number of blocks to remove (instead of sparsity)")
    blocks: list[int] | None = Field(None, description="explicit block indices (method 'drop')")

    def amount(self) -> dict[str, Any]:
        """The amount fields, as given (None where not)."""
        return {k: getattr(self, k) for k in Amount.model_fields}

    def given(self) -> dict[str, Any]:
        """The amount the user gave, ``{field: value}`` (empty: none; the validator allows one)."""
        return {k: v for k, v in self.amount().items() if v is not None}

    def label(self) -> str:
        """The amount in a run directory's name: s0.25, n2, p0.3, b3-4, or empty when none was given."""
        for key, value in self.given().items():
            if key == "blocks":
                return "b" + "-".join(map(str, value)) if value else ""
            return AMOUNT_PREFIX[key] + (f"{value:g}" if isinstance(value, float) else str(value))
        return ""

    @field_validator("blocks")
    @classmethod
    def _blocks_distinct(cls, v):
        if v is not None:
            if any(b < 0 for b in v):
                raise ValueError(f"blocks are indices from 0, got {v}")
            twice = sorted({b for b in v if v.count(b) > 1})
            if twice:
                raise ValueError(f"block {twice[0]} is listed twice in {v}: give each block once")
        return v

    @field_validator("sparsity", "param_sparsity")
    @classmethod
    def _sparsity_in_range(cls, v, info):
        if v is not None and not 0 < v < 1:
            raise ValueError(f"{info.field_name} must be in (0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _one_amount(self):
        if len(self.given()) > 1:
            raise ValueError("give only one of sparsity, num_blocks, blocks, param_sparsity")
        return self


class Quantization(MethodOptions):
    """The bitsandbytes stage (always the last one)."""

    quantize: Literal["int8", "nf4", "fp4"] | None = None
    double_quant: bool = Field(False, description="4-bit: quantize the block scales too (QLoRA)")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="4-bit matmul dtype; default the model's dtype")

    @model_validator(mode="after")
    def _quantization_options(self):
        if (self.double_quant or self.compute_dtype is not None) and self.quantize not in ("nf4", "fp4"):
            raise ValueError("double_quant / compute_dtype apply to 4-bit quantization only: "
                             "add --quantize nf4 (or fp4), or drop them")
        return self


class MethodStage(Amount):
    """A stage of a multi-stage recipe that runs a method; its amount counts the blocks it receives."""

    method: str
    options: dict[str, Any] = Field(default_factory=dict)


class RecoverStage(RecoveryOptions):
    """A recovery fine-tune stage of a multi-stage recipe."""

    recover: Literal["full", "lora", "qlora"]


class QuantizeStage(Quantization):
    """The bitsandbytes stage of a multi-stage recipe."""

    quantize: Literal["int8", "nf4", "fp4"]


def _stage_kind(value) -> str | None:
    """Which stage a recipe entry is, by the key that names its kind."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        return next((kind for kind in ("method", "recover", "quantize") if kind in value), None)
    return None


Stage = Annotated[
    Annotated[MethodStage, Tag("method")] | Annotated[RecoverStage, Tag("recover")]
    | Annotated[QuantizeStage, Tag("quantize")],
    Discriminator(_stage_kind, custom_error_type="stage_kind",
                  custom_error_message="a stage is a mapping with one of the keys method, recover or quantize"),
]
# What a stage sets; with ``stages`` these stay unset at the top level.
STAGE_FIELDS = ("sparsity", "num_blocks", "blocks", "param_sparsity", "options", "recovery", "quantize", "double_quant",
                "compute_dtype")


class CompressConfig(Amount, Quantization):
    """Everything that determines a compressed checkpoint (recorded whole in the manifest).

    One stage from the flags (method, amount, options, then ``recovery`` and ``quantize``) or several
    from a recipe's ``stages:`` list; :meth:`stage_list` gives both the same shape.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    method: str
    calib_data: Literal["wikitext2", "c4", "easy-vqa"] = "wikitext2"  # easy-vqa: image-text, VLMs only
    calib_samples: int = Field(8, ge=1)
    seqlen: int = Field(512, ge=2)
    seed: int = 0
    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = Field(False, description="also load pickle weights (pytorch_model.bin)")
    trust_remote_code: bool = Field(False, description="run the model repository's own code")
    offload: Literal["auto", "none", "cpu", "disk"] = Field(
        "auto", description="where the weights wait while other blocks run: none (all on the device), cpu "
                            "(host memory), disk (their safetensors files); auto chooses from the model's size "
                            "and the free memory")
    offload_dir: str | None = Field(None, description="disk offload: directory for changed blocks (default: temp)")
    max_shard_size: str = Field("5GB", description="largest safetensors shard of the saved checkpoint")
    options: dict[str, Any] = Field(default_factory=dict)
    recovery: RecoveryOptions = Field(default_factory=RecoveryOptions)
    stages: list[Stage] | None = Field(None, description="several stages in order (method, recover, quantize)")

    @model_validator(mode="before")
    @classmethod
    def _recovery_out_of_options(cls, data):
        """``--recover ...`` flags arrive with the method options (and recipes written before
        recovery was a stage keep them there): they belong to the recovery stage."""
        if isinstance(data, dict) and isinstance(data.get("options"), dict):
            options = dict(data["options"])
            moved = {k: options.pop(k) for k in list(options) if k in RecoveryOptions.model_fields}
            if moved:
                given = data.get("recovery") or {}
                given = given.model_dump(exclude_unset=True) if isinstance(given, BaseModel) else dict(given)
                data = {**data, "options": options, "recovery": {**given, **moved}}
        return data

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v):
        from compress_eval.sizes import parse_memory

        try:
            parse_memory(v)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="before")
    @classmethod
    def _method_of_stages(cls, data):
        """A staged config is named by its methods (``fuse+merge``); written out, the name comes back."""
        if isinstance(data, dict) and data.get("stages") is not None and not isinstance(data["stages"], list):
            raise ValueError(f"stages must be a list, one item per stage (stages: [{{method: fuse, sparsity: 0.2}}, "
                             f"{{quantize: nf4}}]), not a {type(data['stages']).__name__}")
        if isinstance(data, dict) and isinstance(data.get("stages"), list):
            names = [s.get("method") if isinstance(s, dict) else getattr(s, "method", None) for s in data["stages"]]
            name = "+".join(n for n in names if isinstance(n, str)) or "none"
            if data.get("method") not in (None, name):
                raise ValueError(f"method {data['method']!r} and stages: name each stage's method in its "
                                 f"stage and leave out method")
            data = {**data, "method": name}
        return data

    @model_validator(mode="after")
    def _stages_alone(self):
        if self.stages is None:
            return self
        if not self.stages:
            raise ValueError("stages is empty: give at least one stage")
        fields = type(self).model_fields
        set_here = [f for f in STAGE_FIELDS if getattr(self, f) != fields[f].get_default(call_default_factory=True)]
        if set_here:
            raise ValueError(f"{set_here[0]} is given beside stages: put it into the stage it belongs to")
        kinds = [_stage_kind(s) for s in self.stages]
        if "quantize" in kinds[:-1]:
            raise ValueError("quantize must be the last stage (methods and fine-tunes need float weights)")
        return self

    def stage_list(self) -> list[MethodStage | RecoverStage | QuantizeStage]:
        """The stages this config runs, in order: its ``stages``, or the one the flags describe."""
        if self.stages is not None:
            return list(self.stages)
        stages: list = [MethodStage(method=self.method, options=self.options, **self.amount())]
        if self.recovery.recover != "none":
            stages.append(RecoverStage(**self.recovery.model_dump()))
        if self.quantize:
            stages.append(QuantizeStage(quantize=self.quantize, double_quant=self.double_quant,
                                        compute_dtype=self.compute_dtype))
        return stages

    def stage_config(self, stage: MethodStage) -> CompressConfig:
        """The one-method config a method stage runs with: this config's calibration and placement, the
        stage's method, amount and options (what the user set stays marked as set, for profiles)."""
        shared = self.model_dump(exclude_unset=True, exclude={"stages", "method", *STAGE_FIELDS})
        return CompressConfig.model_validate({**shared, **stage.model_dump(exclude_none=True)})

    def blocks_to_remove(self, num_layers: int) -> int:
        """ceil(L * sparsity) as the papers round (guarding against 30 * 0.1 = 3.0000000000000004). A
        fraction of the parameters is the same fraction of the blocks: a decoder's blocks are one size."""
        given = self.given()
        if not given:
            raise UserError(f"method {self.method!r} needs an amount: give --sparsity or --num-blocks")
        (key, value), = given.items()
        n = len(set(value)) if key == "blocks" else value if key == "num_blocks" else \
            math.ceil(round(num_layers * value, 6))
        if n < 1:
            raise UserError("nothing to remove: --num-blocks must be at least 1")
        if n >= num_layers:
            raise UserError(
                f"removing {n} of {num_layers} blocks would leave none: lower --sparsity / --num-blocks"
            )
        return n


def validation_message(exc: ValidationError) -> str:
    """The first pydantic error as one line: 'field: message'."""
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "config"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


def make_config(**values) -> CompressConfig:
    try:
        return CompressConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise UserError(f"invalid configuration: {validation_message(exc)}") from exc


def load_recipe(path: str | Path, **overrides) -> CompressConfig:
    """A YAML recipe (the keys of CompressConfig); command-line values override it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} {'is a directory' if path.is_dir() else 'not found'}: give a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not UTF-8 text: give a YAML file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"recipe {path} must be a mapping of CompressConfig keys (model, method, options, ...)")
    recipe_options = data.pop("options", None)
    if recipe_options is None:
        recipe_options = {}
    if not isinstance(recipe_options, dict):
        raise UserError(f"recipe {path}: options must be a mapping of method options (key: value), "
                        f"got {type(recipe_options).__name__}")
    options = {**recipe_options, **overrides.pop("options", {})}
    return make_config(**{**data, **{k: v for k, v in overrides.items() if v is not None}, "options": options})


def dump_recipe(cfg: CompressConfig) -> str:
    """The config as a recipe that loads back to it: model and method first, a staged one without the
    single-stage fields it leaves at their defaults."""
    data = cfg.model_dump(exclude_none=True, exclude=set(STAGE_FIELDS) if cfg.stages else None)
    if cfg.stages:
        data["stages"] = [s.model_dump(exclude_none=True, exclude_defaults=True) | {k: getattr(s, k)}
                          for s in cfg.stages for k in [_stage_kind(s)]]
    first = {k: data.pop(k) for k in ("model", "method")}
    return yaml.safe_dump({**first, **data}, sort_keys=False)
