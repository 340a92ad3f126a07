"""The leaderboard as one static HTML page: the table, sortable by any column with a few lines of
plain JavaScript (no CDN, works from file://), the skipped directories, and the Pareto plot.

Open it with ``#sort=N`` (or ``#sort=-N`` for descending) to have column N sorted on load.
"""

from __future__ import annotations

import datetime as _dt
from html import escape
from pathlib import Path

from compress_eval.results.leaderboard import (AVG_ACC, HEAD, MARKS_NOTE, Board, columns, is_ppl, protocol_note,
                                               row_cells, shown)
from compress_eval.results.store import Run

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; white-space: nowrap; }
td:nth-child(-n+3), th:nth-child(-n+3) { text-align: left; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
tr.reference td { font-weight: 600; background: #f7fbff; }
.muted { color: #666; }
details { text-align: left; }
summary { cursor: pointer; }
details pre { font-size: 12px; white-space: pre-wrap; max-width: 60ch; margin: 4px 0; }
"""

SCRIPT = """
function sortTable(table, col, descending) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const key = (row) => {
    const cell = row.cells[col];
    if (cell.dataset.t !== undefined) return cell.dataset.t;
    const v = cell.dataset.v;
    return v === undefined ? cell.textContent : (v === "" ? null : parseFloat(v));
  };
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);  // empty cells last
    const order = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
    return descending ? -order : order;
  });
  rows.forEach((row) => body.appendChild(row));
  Array.from(table.tHead.rows[0].cells).forEach((th, i) =>
    th.setAttribute("aria-sort", i === col ? (descending ? "descending" : "ascending") : "none"));
}
const board = document.getElementById("board");
Array.from(board.tHead.rows[0].cells).forEach((th, i) => th.addEventListener("click", () =>
  sortTable(board, i, th.getAttribute("aria-sort") === "ascending")));
const wanted = /sort=(-?)(\\d+)/.exec(location.hash);
if (wanted) sortTable(board, parseInt(wanted[2], 10), wanted[1] === "-");
"""


def sort_values(board: Board, i: int) -> list[str | None]:
    """Numbers the script sorts by (None: sort by the cell's text; "": no value, sorted last)."""
    run = board.rows[i]
    sparsity = 0.0 if run.reference else ("" if run.sparsity is None else run.sparsity)
    values = [None, None, sparsity, run.params_kept, run.bytes_after]
    values += [shown(m, run.metrics[m]) if m in run.metrics else "" for m in board.metrics]
    low_high = board.avg_interval.get(i)
    return values + ([100 * low_high[0] if low_high else ""] if AVG_ACC in board.metrics else [])


def detail_text(run: Run) -> str:
    """What made the row, one click away: recipe, removed blocks, stages, seconds, peak memory."""
    m = run.manifest
    if m is None:
        return run.path.name
    lines = [f"run: {run.path.name}", f"removed blocks: {m.removed_blocks or '-'}"]
    lines += [f"stage {k + 1}: {st.method or st.kind}" + (f", removed {st.removed_blocks}" if st.removed_blocks else "")
              + (f", tied {len(st.tied)}" if st.tied else "") + f", {st.seconds:.0f} s" for k, st in enumerate(m.stages)]
    lines.append(f"seconds: {sum(m.timings_s.values()):.0f}" if m.timings_s else "seconds: -")
    lines.append(f"peak RSS: {m.peak_rss_mb:.0f} MB" if m.peak_rss_mb else "peak RSS: -")
    return "\n".join(lines) + ("\n\nrecipe:\n" + m.recipe.strip() if m.recipe else "")


def method_cell(run: Run, text: str) -> str:
    return (f'<td data-t="{escape(text)}"><details><summary>{escape(text)}</summary>'
            f"<pre>{escape(detail_text(run))}</pre></details></td>")


def cell_html(text: str, value) -> str:
    if value is None:
        return f"<td>{escape(text)}</td>"
    return f'<td data-v="{"" if value == "" else repr(float(value))}">{escape(text)}</td>'


def render(board: Board, runs_dir: Path, plot: str | None) -> str:
    hints = [""] * len(HEAD) + ["lower is better" if is_ppl(m) else "higher is better" for m in board.metrics]
    head = "".join(f'<th title="{hint}">{escape(h)}</th>' if hint else f"<th>{escape(h)}</th>"
                   for h, hint in zip(columns(board), hints + [""]))
    rows = []
    for i, run in enumerate(board.rows):
        texts = row_cells(board, i)
        cells = "".join(method_cell(run, t) if k == HEAD.index("method") else cell_html(t, v)
                        for k, (t, v) in enumerate(zip(texts, sort_values(board, i))))
        cls = ' class="reference"' if run.reference else ""
        rows.append(f'<tr{cls} title="{escape(str(run.path.name))}">{cells}</tr>')
    skipped = "".join(f"<li><code>{escape(p.name)}</code>: {escape(why)}</li>" for p, why in board.problems)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>compress-eval leaderboard</title>
<style>{STYLE}</style></head><body>
<h1>compress-eval leaderboard</h1>
<p class="muted">{len(board.rows)} runs from <code>{escape(str(runs_dir))}</code>, {created}.
Deltas in parentheses are against the dense reference (bold) of the same model, measured the same way.
Click a column to sort, a method for what made its row.</p>
{f'<p class="muted">{escape(MARKS_NOTE)}</p>' if board.deltas else ""}
{f'<p class="muted">Measured on: {escape(protocol_note(board))}</p>' if protocol_note(board) else ""}
<table id="board"><thead><tr>{head}</tr></thead>
<tbody>{"".join(rows)}</tbody></table>
{f"<h2>Skipped</h2><ul>{skipped}</ul>" if skipped else ""}
{f'<h2>Pareto plot</h2><img src="{escape(plot)}" alt="quality vs size" style="max-width:100%">' if plot else ""}
<script>{SCRIPT}</script>
</body></html>
"""


def write_html(board: Board, runs_dir: Path, path: Path, plot: str | None) -> Path:
    path.write_text(render(board, runs_dir, plot), encoding="utf-8")
    return path
