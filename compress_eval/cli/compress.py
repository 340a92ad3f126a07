"""``compress-eval compress MODEL --method M --sparsity S --out DIR``."""

from __future__ import annotations

from pathlib import Path

import typer

from compress_eval.cli.common import (AllowPickle, DataDir, Device, Dtype, EvalSeqlen, GenKwargs, MaxShardSize,
                                      MaxWindows, Offload, OffloadDir, Sample, SampleSeed, TrustRemoteCode, int_list,
                                      user_errors)
from compress_eval.config import load_recipe, make_config
from compress_eval.errors import UserError


def scalar(text: str):
    """A command-line value as int, float (1e-3 included), bool, null, list or string."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_options(pairs: list[str] | None, extra: list[str] | None = None) -> dict:
    """Method options from ``--set key=value`` pairs and from method flags (``--num-merge 4``,
    ``--no-permute``); values are parsed as YAML scalars. Unknown keys are rejected later by the
    method's own options model, so a typo is an error, not a silent default."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {pair!r}")
        options[key.strip().replace("-", "_")] = scalar(value)
    extra = list(extra or [])
    while extra:
        flag = extra.pop(0)
        if not flag.startswith("--") or len(flag) < 3:
            raise UserError(f"unexpected argument {flag!r}: method options are --name value or --set name=value")
        name, sep, value = flag[2:].partition("=")
        if not sep:
            if extra and not extra[0].startswith("--"):
                value = extra.pop(0)
            elif name.startswith("no-"):
                name, value = name[3:], "false"
            else:
                value = "true"
        options[name.replace("-", "_")] = scalar(value)
    return options


def build_config(recipe, options: list[str] | None, extra: list[str] | None, **flags):
    """The run's config from the CompressConfig ``flags`` given (None: not given), over the ``recipe`` when
    there is one, with the method options of ``--set`` pairs and extra flags."""
    values = {**flags, "blocks": int_list(flags.get("blocks")), "options": parse_options(options, extra),
              "allow_pickle": flags.get("allow_pickle") or None,
              "trust_remote_code": flags.get("trust_remote_code") or None}
    if recipe:
        return load_recipe(recipe, **values)
    if values.get("method") is None:
        raise UserError("no method given: use --method (see `compress-eval compress --help`) or --recipe")
    return make_config(**values)


@user_errors
def compress_command(
    ctx: typer.Context,
    model: str = typer.Argument(None, help="alias, Hub id or local directory (or give it in --recipe)"),
    method: str = typer.Option(None, "--method", "-m", help="compression method (see `compress-eval methods`)"),
    sparsity: float = typer.Option(None, help="fraction of blocks to remove, in (0, 1); rounded up"),
    num_blocks: int = typer.Option(None, help="number of blocks to remove (instead of --sparsity)"),
    param_sparsity: float = typer.Option(None, help="fraction of the decoder blocks' parameters to remove, in "
                                                    "(0, 1) (instead of --sparsity; compares block and sublayer "
                                                    "methods at one size)"),
    blocks: str = typer.Option(None, help="explicit blocks for --method drop, e.g. 3,4"),
    calib_data: str = typer.Option(None, help="calibration corpus: wikitext2 or c4 (text), or easy-vqa (image-text "
                                   "pairs through a vision-language model, its language model seeing image tokens)"),
    calib_samples: int = typer.Option(None, help="number of calibration windows"),
    seqlen: int = typer.Option(None, help="calibration window length in tokens"),
    seed: int = typer.Option(None),
    quantize: str = typer.Option(None, help="bitsandbytes stage after the method: int8, nf4 or fp4"),
    double_quant: bool = typer.Option(None, "--double-quant/--no-double-quant",
                                      help="nf4/fp4: quantize the block scales too"),
    compute_dtype: str = typer.Option(None, help="nf4/fp4 matmul dtype: auto, float32, bfloat16, float16"),
    out: Path = typer.Option(None, "--out", "-o", help="output directory (must not exist)"),
    recipe: Path = typer.Option(None, help="YAML recipe (CompressConfig keys); flags override it"),
    options: list[str] = typer.Option(None, "--set", help="method option key=value (repeatable)"),
    then_eval: str = typer.Option(None, help="tasks to evaluate the result on, e.g. wiki,c4,piqa,arc_e"),
    eval_seqlen: int = EvalSeqlen,
    max_windows: int = MaxWindows,
    batch_size: int = typer.Option(1, min=1, help="evaluation batch size"),
    limit: float = typer.Option(None, help="lm-eval tasks: only the first N documents (a fraction if < 1)"),
    sample: str = Sample,
    sample_seed: int = SampleSeed,
    num_fewshot: int = typer.Option(None, min=0, help="lm-eval tasks: few-shot examples"),
    gen_kwargs: str = GenKwargs,
    data_dir: str = DataDir,
    device: str = Device,
    dtype: str = Dtype,
    allow_pickle: bool = AllowPickle,
    trust_remote_code: bool = TrustRemoteCode,
    offload: str = Offload,
    offload_dir: str = OffloadDir,
    max_shard_size: str = MaxShardSize,
    push_to_hub: str = typer.Option(None, help="Hub repository NAMESPACE/NAME to upload the checkpoint to, "
                                               "with its model card (after --then-eval)"),
    private: bool = typer.Option(False, "--private", help="--push-to-hub: create the repository private"),
) -> None:
    """Compress a model, save a checkpoint with its manifest, then (--then-eval) evaluate it.

    Method options (see `compress-eval methods`) are given as extra flags, e.g. `--num-merge 4
    --no-permute`, or as `--set key=value`.
    """
    from compress_eval.cli.evaluate import parse_gen_kwargs, parse_limit, run_evaluation
    from compress_eval.eval_config import EvalConfig
    from compress_eval.tasknames import parse_tasks
    from compress_eval.pipeline import compress_to_dir
    from compress_eval.results.hub import check_push, push

    cfg = build_config(recipe, options, ctx.args, model=model, method=method, sparsity=sparsity, num_blocks=num_blocks,
                       blocks=blocks, param_sparsity=param_sparsity, calib_data=calib_data,
                       calib_samples=calib_samples, seqlen=seqlen, seed=seed, device=device, dtype=dtype,
                       quantize=quantize, double_quant=double_quant, compute_dtype=compute_dtype,
                       allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, offload=offload,
                       offload_dir=offload_dir, max_shard_size=max_shard_size)
    # Bad evaluation settings (task names, --limit with --sample, ...) fail before compressing.
    evaluation = EvalConfig(
        tasks=parse_tasks(then_eval), seqlen=eval_seqlen, max_windows=max_windows, batch_size=str(batch_size),
        device=device, dtype=dtype, limit=parse_limit(limit), sample=sample, sample_seed=sample_seed,
        num_fewshot=num_fewshot, gen_kwargs=parse_gen_kwargs(gen_kwargs), data_dir=data_dir,
        offload=cfg.offload) if then_eval else None  # our checkpoint: always safetensors
    if push_to_hub:
        check_push(push_to_hub)  # a bad id, offline mode or no token: known now, not after the compression
    elif private:
        raise UserError("--private applies to --push-to-hub: add --push-to-hub REPO, or drop --private")
    path = compress_to_dir(cfg, out, data_dir)
    typer.echo(f"saved {path}")
    if evaluation:
        run_evaluation(str(path), evaluation)
    if push_to_hub:  # after the evaluation, so the card on the Hub has its results
        typer.echo(f"pushed {path} to {push(path, push_to_hub, private)}")


METHOD_FLAGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def register(app: typer.Typer) -> None:
    app.command("compress", context_settings=METHOD_FLAGS)(compress_command)
    # `run` is the one-command path "model -> leaderboard row": the same steps, named for the product.
    app.command("run", context_settings=METHOD_FLAGS,
                help="Compress, save and evaluate in one command (same options as compress).")(compress_command)
