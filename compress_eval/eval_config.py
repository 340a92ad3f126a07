"""How to evaluate: one typed object from the CLI (or a grid cell) down to lm-eval and our perplexity.

Resolved once and never mutated, like ``CompressConfig``: every function of the evaluation path reads
the settings it needs from it instead of taking them one by one.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress_eval.errors import UserError


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[str, ...] = Field(description="canonical task names (tasknames.parse_tasks)")
    seqlen: int = Field(2048, ge=2, description="perplexity window length")
    max_windows: int | None = Field(None, ge=1, description="perplexity: only the first N windows")
    batch_size: str = Field("1", description="a positive integer, or auto (lm-eval finds the largest)")
    device: str | None = None
    dtype: str | None = None
    limit: int | float | None = Field(None, gt=0, description="lm-eval tasks: the first N documents (< 1: a fraction)")
    sample: int | dict[str, int] | None = Field(
        None, description="lm-eval tasks: a seeded sample of N documents of each, or per task ({hellaswag: 2000}: "
                          "the other tasks whole); also given as text, 2000 or hellaswag=2000,arc_e=500")
    sample_seed: int = Field(0, description="the seed of --sample's documents")
    num_fewshot: int | None = Field(None, ge=0)
    gen_kwargs: dict | None = Field(None, description="lm-eval's generation settings over the tasks' own")
    data_dir: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    offload: str = "auto"
    progress: bool = True

    @field_validator("sample", mode="before")
    @classmethod
    def _sample_sizes(cls, value):
        """N, or {lm-eval task name: N}, from a number, a mapping or the CLI's text."""
        if value is None or isinstance(value, int):
            return check_size(value, "--sample")
        if isinstance(value, str):
            if "=" not in value:
                return check_size(int(value) if value.strip().isdigit() else value, "--sample")
            try:
                value = dict(part.split("=") for part in value.split(","))
            except ValueError:
                raise UserError(f"--sample takes N or task=N pairs joined by commas (hellaswag=2000), got "
                                f"{value!r}") from None
        from compress_eval.tasknames import PPL_TASKS, parse_tasks

        sizes = {}
        for name, n in dict(value).items():
            task = parse_tasks(str(name).strip())[0]
            if task in PPL_TASKS.values():
                raise UserError(f"--sample {name}=...: perplexity reads --max-windows windows, not documents")
            sizes[task] = check_size(int(n) if str(n).strip().isdigit() else n, f"--sample {name}=")
        return sizes

    @model_validator(mode="after")
    def _one_selection(self):
        if self.limit is not None and self.sample is not None:
            raise UserError("--limit (the first N documents) and --sample (a seeded N) choose the documents two "
                            "ways: give one of them")
        text = str(self.batch_size)
        if not (text == "auto" or (text.isdigit() and int(text) >= 1)):
            raise UserError(f"--batch-size must be a positive integer or auto, got {text!r}")
        return self

    def sample_size(self, task: str) -> int | None:
        """Documents to sample from an lm-eval task (its name or offline twin's), None: the task is not sampled."""
        from compress_eval.tasknames import display_name

        if isinstance(self.sample, dict):
            return self.sample.get(display_name(task))
        return self.sample

    def selection(self, task: str) -> dict:
        """How an lm-eval task's documents were chosen, as the per-document records keep it."""
        if self.sample_size(task) is not None:
            return {"sample": self.sample_size(task), "seed": self.sample_seed}
        return {"limit": self.limit} if self.limit is not None else {}

    @property
    def ppl_batch(self) -> int:
        """Perplexity's batch size (``auto`` is lm-eval's: perplexity then uses 1)."""
        return int(self.batch_size) if str(self.batch_size).isdigit() else 1


def check_size(n, what: str):
    if n is not None and (not isinstance(n, int) or n < 1):
        raise UserError(f"{what} must be a positive number of documents, got {n!r}")
    return n
