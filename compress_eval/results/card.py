"""The model card (``README.md``) of a checkpoint, in the Hub's convention: front matter built with
huggingface_hub's own ``ModelCardData``, and a body saying what was done to the model, what it
scored and how to load it.

Pure (manifest and results in, text out), so every save and every evaluation can render it again
from what the run directory holds; reading and writing that directory is ``store``'s. Results go in
a markdown table, not in ``model-index``: offline task copies and ``--limit`` subsets have no Hub
dataset id, and a partial run must not read as a published score.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from compress_eval.manifest import Manifest
from compress_eval.tasknames import display_name

# Marks a card as compress-eval's: a README.md without this line (a user's) is never overwritten.
MARKER = ("<!-- model card written by compress-eval from compress_eval.json and the results beside it, "
          "and rewritten on every save and eval: delete this line to keep your own edits -->")
EVAL_TASKS = "wiki,c4,piqa,arc_e,arc_c,hs,wg"


def table(header: list[str], rows: list[list]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def kept(after: int, before: int) -> str:
    return f"{after:,} ({after / before:.1%})"


def stages_of(manifest: Manifest) -> list[dict]:
    """The manifest's stage records as plain dicts (none in manifests written before stages existed)."""
    return manifest.model_dump(mode="json").get("stages") or []


def methods_of(manifest: Manifest) -> list[str]:
    """The methods of the run, in order (the stages', else the one the manifest names)."""
    return [s["method"] for s in stages_of(manifest) if s.get("kind") == "method"] or [manifest.method]


def card_tags(manifest: Manifest) -> list[str]:
    tags = ["compress-eval", *(m for m in methods_of(manifest) if m != "none")]
    if manifest.removed_blocks:
        tags.append("pruned")
    if manifest.quantized:
        tags += ["quantized", manifest.quantization.get("kind")]
    return list(dict.fromkeys(t for t in tags if t))


def amount(config: dict) -> str:
    """How much the (single-stage) config asked for: its amount and explicit method options."""
    parts = []
    if config.get("sparsity") is not None:
        parts.append(f"sparsity {config['sparsity']}")
    if config.get("num_blocks") is not None:
        parts.append(f"{config['num_blocks']} blocks")
    if config.get("blocks"):
        parts.append("blocks " + ", ".join(map(str, config["blocks"])))
    parts += [f"{k}={v}" for k, v in sorted((config.get("options") or {}).items())]
    return ", ".join(parts)


def compression_section(manifest: Manifest) -> str:
    sizes = table(["", "before", "after"], [
        ["blocks", manifest.blocks_before, manifest.blocks_after or manifest.blocks_before],
        ["parameters", f"{manifest.params_before:,}", kept(manifest.params_after, manifest.params_before)],
        ["weight bytes", f"{manifest.weight_bytes_before:,}",
         kept(manifest.weight_bytes_after, manifest.weight_bytes_before)],
    ])
    methods = methods_of(manifest)
    how = amount(manifest.config)
    facts = [f"- **Method{'s' if len(methods) > 1 else ''}**: " + ", ".join(f"`{m}`" for m in methods)
             + (f" ({how})" if how else "")]
    if manifest.removed_blocks:
        facts.append("- **Removed blocks** (indices in the original model): "
                     + ", ".join(map(str, manifest.removed_blocks)))
    if manifest.tie_map:
        facts.append("- **Tied modules** (stored once, re-tied on load): "
                     + ", ".join(f"`{dst}` → `{src}`" for dst, src in manifest.tie_map.items()))
    if manifest.skipped:
        facts.append("- **Removed sublayers** (no weights; empty modules on load): "
                     + ", ".join(f"`{path}`" for path in manifest.skipped))
    if manifest.recovery:
        r = manifest.recovery
        facts.append(f"- **Recovery**: {r.get('mode')} fine-tune, {r.get('steps')} steps, learning rate "
                     f"{number(r.get('lr'))}, loss {number(r.get('loss_first'))} → {number(r.get('loss_last'))}")
    if manifest.quantized:
        q = manifest.quantization
        options = [f"compute dtype {q['compute_dtype']}"] if q.get("compute_dtype") else []
        options += ["double quantization"] if q.get("double_quant") else []
        options += [f"{len(q['unquantized'])} linears stay float (shapes the 4-bit kernels refuse)"] \
            if q.get("unquantized") else []
        facts.append(f"- **Quantization**: bitsandbytes {q.get('kind')}" + "".join(f", {o}" for o in options))
    parts = ["## Compression", sizes, "\n".join(facts)]
    stages = stages_of(manifest)
    if stages:
        parts += ["### Stages", table(
            ["#", "stage", "removed blocks", "tied modules", "parameters after", "weight bytes after", "seconds"],
            [[n, s.get("method") or s.get("kind"), ", ".join(map(str, s.get("removed_blocks") or [])),
              ", ".join(f"`{t}`" for t in s.get("tied") or []), f"{s.get('params_after', 0):,}",
              f"{s.get('weight_bytes_after', 0):,}", s.get("seconds", "")]
             for n, s in enumerate(stages, 1)])]
    return "\n\n".join(parts)


def results_section(ppl: dict, accuracies: dict[str, float], lm_eval: dict) -> str:
    """Perplexity (our protocol, results_ppl.json) and lm-eval accuracies, one row per task."""
    rows = [[key.removesuffix("_ppl"), "perplexity", "not finite" if r.get("ppl") is None else f"{r['ppl']:.4f}",
             f"{r.get('windows')} windows of {r.get('seqlen')} tokens"] for key, r in ppl.items()]
    samples, shots = lm_eval.get("n-samples") or {}, lm_eval.get("n-shot") or {}
    for task, acc in accuracies.items():
        n = samples.get(task) or {}
        where = [f"{n['effective']} of {n['original']} documents"] if "effective" in n else []
        where += [f"{shots[task]}-shot"] if task in shots else []
        rows.append([display_name(task), "accuracy", f"{acc:.4f}", ", ".join(where)])
    if not rows:
        return f"## Results\n\nNo evaluations yet: `compress-eval eval DIR --tasks {EVAL_TASKS}` adds them here."
    parts = ["## Results", table(["task", "metric", "value", "evaluated on"], rows)]
    limit = (lm_eval.get("config") or {}).get("limit")
    if limit is not None and accuracies:
        parts.append(f"lm-eval ran with `--limit {limit}`: accuracies on a subset of each task, not comparable "
                     f"with full-task scores.")
    return "\n\n".join(parts)


def usage_section(manifest: Manifest, repo_id: str | None, multimodal: bool = False) -> str:
    """``compress-eval eval`` always; transformers alone only when nothing needs our loader (a VLM's
    Auto classes for a vision-language model)."""
    download = f"hf download {repo_id} --local-dir DIR\n" if repo_id else ""
    parts = ["## Use", f"`DIR` is this checkpoint's directory{', downloaded from the Hub first' if repo_id else ''}:",
             f"```bash\n{download}compress-eval eval DIR --tasks {EVAL_TASKS}\n```"]
    needs = ([f"stores {len(manifest.tie_map)} tied module(s) once (`tie_map`)"] if manifest.tie_map else []) \
        + ([f"removed {len(manifest.skipped)} sublayer(s) (`skipped`)"] if manifest.skipped else []) \
        + (["is quantized with bitsandbytes"] if manifest.quantized else [])
    if needs:
        parts += [f"This checkpoint {' and '.join(needs)}: load it through compress-eval's loader, which "
                  f"reads `compress_eval.json` to rebuild, re-tie and place its weights "
                  f"(`compress-eval export DIR --out PLAIN` writes a copy plain transformers loads).",
                  "```python\nfrom compress_eval.models.loading import load_model\n\n"
                  "model, tokenizer, _ = load_model(\"DIR\")\n```"]
    else:
        auto, pre, name = (("AutoModelForImageTextToText", "AutoProcessor", "processor") if multimodal
                           else ("AutoModelForCausalLM", "AutoTokenizer", "tokenizer"))
        parts.append(f"```python\nfrom transformers import {auto}, {pre}\n\n"
                     f"model = {auto}.from_pretrained(\"DIR\")\n"
                     f"{name} = {pre}.from_pretrained(\"DIR\")\n```")
    return "\n\n".join(parts)


def recipe_section(manifest: Manifest, repo_id: str | None) -> str:
    """The command that makes the checkpoint again: its recipe (the seed fixes the calibration windows)
    on the same model and the same data, the local directory the run read or the Hub."""
    download = f"hf download {repo_id} recipe.yaml --local-dir .\n" if repo_id else ""
    local = manifest.base_model.kind == "local"
    data = f" --data-dir {manifest.data_dir}" if manifest.data_dir else ""
    command = f"{download}compress-eval compress{' MODEL' if local else ''} --recipe recipe.yaml{data} --out OUT"
    notes = ([f"`MODEL` is the model it was compressed from (`{manifest.base_model.name}` where it was made)."]
             if local else [])
    notes += ([f"`{manifest.data_dir}` is the data directory the run read (`compress-eval data prepare --dir DIR` "
               f"writes one; without `--data-dir` the Hub's splits give other calibration windows)."]
              if data else [])
    return "\n\n".join(["## Recipe", "This command makes it again:", f"```bash\n{command}\n```", *notes,
                        f"```yaml\n{manifest.recipe.rstrip()}\n```"])


def render_card(manifest: Manifest, base_model: str | None = None, ppl: dict | None = None,
                accuracies: dict[str, float] | None = None, lm_eval: dict | None = None,
                repo_id: str | None = None, multimodal: bool = False) -> str:
    """The README.md text. ``base_model``: the Hub id of the compressed model, if it has one;
    ``accuracies``: {lm-eval task: accuracy} as the leaderboard reads them from ``lm_eval`` (lm-eval's
    results JSON, which also gives documents, shots and limit); ``repo_id``: where the card is pushed;
    ``multimodal``: a vision-language model (its pipeline tag and Auto classes)."""
    data = ModelCardData(base_model=base_model, library_name="transformers",
                         pipeline_tag="image-text-to-text" if multimodal else "text-generation",
                         tags=card_tags(manifest))
    name = base_model or manifest.base_model.name
    done = [m for m in methods_of(manifest) if m != "none"]
    done += [f"{manifest.recovery.get('mode')} recovery"] if manifest.recovery else []
    done += [manifest.quantization.get("kind")] if manifest.quantized else []
    intro = (f"`{name}` compressed with compress-eval"
             + (f" on {manifest.created[:10]}" if manifest.created else "")
             + ". Everything else (per-step timings, package versions, git sha) is in `compress_eval.json`.")
    body = [f"# {Path(name).name}: {' + '.join(done) or 'unchanged'}", intro,
            compression_section(manifest), results_section(ppl or {}, accuracies or {}, lm_eval or {}),
            usage_section(manifest, repo_id, multimodal)]
    if manifest.recipe:
        body.append(recipe_section(manifest, repo_id))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{MARKER}\n\n" + "\n\n".join(body) + "\n"))
