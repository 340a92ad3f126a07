"""The leaderboard: every run directory as a row (method x sparsity), every task as a column, with
deltas against the dense reference of the same model; as markdown, CSV, HTML and a Pareto plot.

Deltas are only given where they mean something: a perplexity is compared with the reference's
only when both were measured with the same window length and number of windows, an accuracy only
on the same documents. Where both runs kept per-document records, the delta is tested (paired
bootstrap and exact McNemar, ``results.paired``) and marked when it is more than chance; the mean
accuracy gets its 95 % interval.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from compress_eval.errors import UserError
from compress_eval.results import compare, paired
from compress_eval.results.store import LOCK_DIR, Run, RunError, is_run, read_run
from compress_eval.tasknames import PPL_TASKS, display_name, parse_tasks

PPL_ORDER = ["wikitext2_ppl", "c4_ppl"]
ACC_ORDER = ["piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"]  # FuseGPT's Table II
AVG_ACC = "avg_acc"


@dataclass
class Board:
    rows: list[Run]
    metrics: list[str]  # column order: perplexities, accuracies, then their mean
    problems: list[tuple[Path, str]] = field(default_factory=list)  # skipped directories and why
    deltas: dict[tuple[int, str], float] = field(default_factory=dict)  # (row index, metric) -> delta
    # (row index, metric) -> whether the delta is more than chance (absent: not paired, no records)
    significant: dict[tuple[int, str], bool] = field(default_factory=dict)
    avg_interval: dict[int, tuple[float, float]] = field(default_factory=dict)  # row -> 95 % CI of avg acc


def is_ppl(metric: str) -> bool:
    return metric.endswith("_ppl")


def collect(runs_dir: Path, exclude: Path | None = None) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every readable run under ``runs_dir`` (itself, or its sub-directories), and the rest with why."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return [], [(runs_dir, "not a directory")]
    candidates = [runs_dir] if is_run(runs_dir) else sorted(
        p for p in runs_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name != LOCK_DIR
        and (exclude is None or p.resolve() != Path(exclude).resolve()))
    runs, problems = [], []
    for path in candidates:
        try:
            runs.append(read_run(path))
        except RunError as exc:
            problems.append((path, str(exc)))
    return runs, problems


def metric_order(runs: list[Run]) -> list[str]:
    present = {m for r in runs for m in r.metrics}
    ppl = [m for m in PPL_ORDER if m in present] + sorted(m for m in present if is_ppl(m) and m not in PPL_ORDER)
    acc = [m for m in ACC_ORDER if m in present] + sorted(m for m in present - set(ppl) if m not in ACC_ORDER)
    return ppl + acc + ([AVG_ACC] if acc else [])


def add_mean_accuracy(runs: list[Run], acc_metrics: list[str]) -> None:
    """Mean accuracy over the task columns, for the runs that have every one of them."""
    for run in runs:
        if acc_metrics and all(m in run.metrics for m in acc_metrics):
            run.metrics[AVG_ACC] = sum(run.metrics[m] for m in acc_metrics) / len(acc_metrics)


def sort_key(run: Run):
    return (run.model, not run.reference, run.label, run.sparsity or 0.0, run.path.name)


def sort_metric(sort: str, metrics: list[str]) -> str:
    """The column ``--sort`` names: ``avg``, ``ppl`` (the first perplexity column) or a task, short or
    full name (``arc_e``, ``hellaswag``, ``c4``)."""
    if sort == "avg":
        wanted = AVG_ACC
    elif sort == "ppl":
        wanted = next((m for m in metrics if is_ppl(m)), "wikitext2_ppl")
    else:
        task = parse_tasks(sort)[0]
        wanted = f"{task}_ppl" if task in PPL_TASKS.values() else task
    match = [m for m in metrics if m == wanted or display_name(m) == wanted]
    if not match:
        shown_names = ", ".join(["avg", "ppl"] + [display_name(m) for m in metrics if m != AVG_ACC])
        raise UserError(f"--sort {sort}: no run has that column; sort by one of {shown_names}")
    return match[0]


def ranked(runs: list[Run], metric: str) -> list[Run]:
    """Best first on ``metric`` (lowest perplexity, highest accuracy); runs without it last."""
    sign = 1 if is_ppl(metric) else -1
    return sorted(runs, key=lambda r: (metric not in r.metrics, sign * r.metrics.get(metric, 0.0), sort_key(r)))


def reference_value(run: Run, metric: str, references: list[Run]) -> Run | None:
    """The dense run of ``run``'s model with ``metric`` measured under the same protocol as ``run``'s."""
    for ref in references:
        if ref.model == run.model and metric in ref.metrics and ref.protocol.get(metric) == run.protocol.get(metric):
            return ref
    return None


def build(runs_dir: Path, exclude: Path | None = None, sort: str | None = None) -> Board:
    runs, problems = collect(runs_dir, exclude)
    metrics = metric_order(runs)
    acc_metrics = [m for m in metrics if not is_ppl(m) and m != AVG_ACC]
    add_mean_accuracy(runs, acc_metrics)
    rows = ranked(runs, sort_metric(sort, metrics)) if sort else sorted(runs, key=sort_key)
    board = Board(rows, metrics, problems)
    references = [r for r in rows if r.reference]
    for i, run in enumerate(rows):
        for metric in metrics:
            ref = reference_value(run, metric, references)
            if not run.reference and ref is not None and metric in run.metrics:
                board.deltas[(i, metric)] = run.metrics[metric] - ref.metrics[metric]
                mark_significance(board, i, ref, metric, acc_metrics)
        vectors = compare.accuracy_vectors(run.records, [display_name(m) for m in acc_metrics])
        if acc_metrics and vectors:
            board.avg_interval[i] = paired.average_accuracy(vectors)[1:]
    return board


def mark_significance(board: Board, i: int, ref: Run, metric: str, acc_metrics: list[str]) -> None:
    """Whether row i's delta on ``metric`` against ``ref`` is more than chance, where both kept records."""
    run = board.rows[i]
    names = (ref.path.name, run.path.name)
    if metric == AVG_ACC:
        result = compare.pair_average(ref.records, run.records, [display_name(m) for m in acc_metrics], names)
        if result is not None:
            board.significant[(i, metric)] = result[1] > 0 or result[2] < 0
        return
    pair = compare.pair_metric(ref.records, run.records, display_name(metric), names)
    if pair is not None:
        board.significant[(i, metric)] = pair.result.significant


# --- cells as text -------------------------------------------------------------------------------

def metric_title(metric: str) -> str:
    if metric == AVG_ACC:
        return "avg acc (%)"
    return f"{metric.removesuffix('_ppl')} ppl" if is_ppl(metric) else f"{display_name(metric)} (%)"


def shown(metric: str, value: float) -> float:
    """Accuracies are shown in percent, as the papers print them."""
    return value if is_ppl(metric) else 100 * value


def metric_text(board: Board, i: int, metric: str) -> str:
    value = board.rows[i].metrics.get(metric)
    if value is None:
        return "-"
    text = f"{shown(metric, value):.2f}"
    delta = board.deltas.get((i, metric))
    mark = SIGNIFICANT if board.significant.get((i, metric)) else ""
    return text if delta is None else f"{text} ({shown(metric, delta):+.2f}{mark})"


SIGNIFICANT = "*"
MARKS_NOTE = (f"{SIGNIFICANT}: the delta from the dense row is more than chance at 95 % (paired bootstrap interval "
              f"over documents excludes 0 and exact McNemar p < 0.05; perplexity: bootstrap over windows; mean "
              f"accuracy: paired bootstrap over every task's documents). Deltas without it are within chance where "
              f"both runs kept per-document records (records.json), untested where not.")


def interval_text(board: Board, i: int) -> str:
    low_high = board.avg_interval.get(i)
    return "-" if low_high is None else f"[{100 * low_high[0]:.2f}, {100 * low_high[1]:.2f}]"


def sparsity_text(run: Run) -> str:
    if run.reference:
        return "0%"
    blocks = f"{run.removed_blocks}/{run.blocks_before} blocks" if run.removed_blocks else ""
    if run.sparsity is None:
        return blocks or "-"
    return f"{100 * run.sparsity:.4g}%" + (f" ({blocks})" if blocks else "")


def method_text(run: Run) -> str:
    return "dense (none)" if run.reference and run.label == "none" else run.label


HEAD = ["model", "method", "sparsity", "params kept", "weights (MB)"]
AVG_INTERVAL_TITLE = "avg acc 95 % CI"


def columns(board: Board) -> list[str]:
    """The table's header: the run's description, each metric, and the mean accuracy's interval."""
    tail = [AVG_INTERVAL_TITLE] if AVG_ACC in board.metrics else []
    return HEAD + [metric_title(m) for m in board.metrics] + tail


def row_cells(board: Board, i: int) -> list[str]:
    run = board.rows[i]
    megabytes = run.bytes_after / 1e6
    tail = [interval_text(board, i)] if AVG_ACC in board.metrics else []
    return [run.model, method_text(run), sparsity_text(run), f"{100 * run.params_kept:.1f}%",
            f"{megabytes:.1f}" if megabytes >= 10 else f"{megabytes:.2f}"] + [metric_text(board, i, m)
                                                                              for m in board.metrics] + tail


def protocol_note(board: Board) -> str:
    """How each column was measured (windows of perplexity, documents of each lm-eval task), from the runs."""
    parts = []
    for metric in board.metrics:
        seen = sorted({r.protocol[metric] for r in board.rows if r.protocol.get(metric)}, key=str)
        if not seen or metric == AVG_ACC:
            continue
        if is_ppl(metric):
            said = ", ".join(f"{windows} windows of {seqlen} tokens" for seqlen, windows in seen)
        else:
            said = ", ".join(documents_text(*seen_protocol) for seen_protocol in seen)
        parts.append(f"{metric_title(metric).removesuffix(' (%)')}: {said}")
    return "; ".join(parts) + "." if parts else ""


def documents_text(n, total, chosen: str = "first") -> str:
    if n == total:
        return f"all {total} documents"
    return f"{n} of {total} documents ({'the first' if chosen == 'first' else 'a sample, ' + chosen})"


def markdown(board: Board) -> str:
    head = columns(board)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row_cells(board, i)) + " |" for i in range(len(board.rows))]
    note = protocol_note(board)
    notes = [f"Measured on: {note}"] if note else []
    notes += [MARKS_NOTE] if board.deltas else []
    return "\n".join(lines) + "\n" + "".join(f"\n{n}\n" for n in notes)


def write_csv(board: Board, path: Path) -> None:
    """Raw numbers (accuracies as fractions), one row per run, with the deltas beside them."""
    fields = ["run", "model", "method", "label", "sparsity", "removed_blocks", "blocks_before", "params_before",
              "params_after", "params_kept", "weight_bytes_before", "weight_bytes_after"]
    for metric in board.metrics:
        fields += [metric, f"{metric}_delta", f"{metric}_significant"]
    fields += ["avg_acc_ci_low", "avg_acc_ci_high"]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        for i, r in enumerate(board.rows):
            row = [r.path.name, r.model, r.method, r.label, r.sparsity, r.removed_blocks, r.blocks_before,
                   r.params_before, r.params_after, round(r.params_kept, 6), r.bytes_before, r.bytes_after]
            for metric in board.metrics:
                row += [r.metrics.get(metric), board.deltas.get((i, metric)), board.significant.get((i, metric))]
            row += list(board.avg_interval.get(i, (None, None)))
            writer.writerow(["" if v is None else v for v in row])


# --- Pareto plot ---------------------------------------------------------------------------------

def pareto_front(points: list[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """Points that no other point beats on both size (smaller) and quality."""
    sign = 1 if lower_is_better else -1
    front, best = [], math.inf
    for x, y in sorted(points, key=lambda p: (p[0], sign * p[1])):
        if sign * y < best:
            front.append((x, y))
            best = sign * y
    return front


def plot_metrics(board: Board) -> list[str]:
    """The perplexity shown first in the table and the mean accuracy, where runs have them."""
    ppl = [m for m in board.metrics if is_ppl(m)][:1]
    return ppl + [m for m in board.metrics if m == AVG_ACC]


def pareto_png(board: Board, path: Path) -> Path | None:
    """Quality vs parameters kept and vs bytes of weights; dashed: each model's Pareto front."""
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.ticker import ScalarFormatter

    from compress_eval.scoring.chart import new_figure

    metrics = plot_metrics(board)
    if not metrics:
        return None
    axes_x = [("parameters kept (%)", lambda r: 100 * r.params_kept), ("weights (MB)", lambda r: r.bytes_after / 1e6)]
    fig = new_figure((12, 4.5 * len(metrics)))
    axes = fig.subplots(len(metrics), 2, squeeze=False)
    labels = sorted({method_text(r) for r in board.rows})
    colors = {label: colormaps["tab10"](i % 10) for i, label in enumerate(labels)}
    models = sorted({r.model for r in board.rows})
    markers = {m: "os^Dvp*"[i % 7] for i, m in enumerate(models)}
    for (metric, ax_row) in zip(metrics, axes):
        for ax, (xlabel, x_of) in zip(ax_row, axes_x):
            for model in models:
                runs = [r for r in board.rows if r.model == model and metric in r.metrics]
                for r in runs:
                    ax.scatter(x_of(r), shown(metric, r.metrics[metric]), color=colors[method_text(r)],
                               marker=markers[model], s=50, edgecolor="black", linewidth=0.5, zorder=3)
                front = pareto_front([(x_of(r), shown(metric, r.metrics[metric])) for r in runs], is_ppl(metric))
                if front:
                    ax.plot(*zip(*front), linestyle="--", color="gray", linewidth=1, zorder=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(metric_title(metric) + (" (log)" if is_ppl(metric) else ""))
            if is_ppl(metric):
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(ScalarFormatter())
                ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], marker="o", linestyle="", color=colors[lab], label=lab) for lab in labels]
    handles += [Line2D([], [], marker=markers[m], linestyle="", color="gray", label=m) for m in models]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 5), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (4.5 * len(metrics))))
    fig.savefig(path, dpi=110)
    return path
