"""Results of an experiment: ``results.csv``, ``results.md``, ``results.png`` and TensorBoard scalars.

Each evaluation stage's ``results.csv`` (written by ``make eval``) gives one cell per task. A
:class:`Layout` says how the cells form the paper's table: rows are tasks and columns variants
(``by="task"``: Table 1, Figures 5 and 6, data scaling), or rows and columns are the variants' own
``row`` and ``column`` labels for one task (``by="variant"``: Swap, Figure 4 left). Every cell of
ours is ``rate % (successes/episodes)``; the paper's number stands in the column beside it
(empty where the paper gives it only in a figure).

``results.csv``: one row per (variant, task), plus an ``average`` row per variant in the task
layout: experiment, variant, label, task, successes, episodes, rate, paper_rate (rates as
fractions; paper_rate empty when the paper's text has no number).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Variant:
    """One evaluated policy of an experiment: ``stage`` is its evaluation stage; ``paper``: task ->
    the paper's success rate in % (None or absent: not in the paper's text)."""

    id: str
    label: str
    stage: str
    paper: dict = field(default_factory=dict)
    paper_average: float | None = None  # the paper's printed average over the table's tasks (else their mean)
    row: str = ""     # by="variant": the row label
    column: str = ""  # by="variant": the column label


@dataclass
class Check:
    """A target of the issue, as a number computed from the results: ``value(results)`` -> float
    (None when a cell is missing); met when it is ``>= at_least`` and ``<= at_most`` (those given)."""

    text: str
    value: object
    at_least: float | None = None
    at_most: float | None = None
    unit: str = "points"

    def verdict(self, value: float) -> str:
        ok = (self.at_least is None or value >= self.at_least) and (self.at_most is None or value <= self.at_most)
        return "met" if ok else "NOT met"

    def target(self) -> str:
        parts = [f"{op} {bound:g}" for op, bound in ((">=", self.at_least), ("<=", self.at_most)) if bound is not None]
        return " and ".join(parts)


def pacing_note(settings: dict) -> str:
    """The "what differs" note on how VLM+DP was paced, from the run's ``query_every_step``."""
    if settings["query_every_step"]:
        return "VLM+DP queries the VLM at every control step (QUERY_EVERY_STEP=true), as the paper does."
    return ("VLM+DP runs with the DP pacing the plan (QUERY_EVERY_STEP=false, the cpu preset's default: the VLM "
            "is asked when the DP's line has ended); the paper queries the VLM at every step (README: every-step "
            "37.5 % against DP-paced 85.9 % on L0 with the cpu VLM).")


def difference(x: float | None, y: float | None) -> float | None:
    """``x - y``, None when either is missing (for checks)."""
    return None if x is None or y is None else x - y


@dataclass
class Layout:
    """How an experiment's evaluations form its table (module docstring), its targets and notes."""

    title: str
    variants: list[Variant]
    rows: list[tuple[str, list[str]]]  # by="task": (heading or "", tasks); by="variant": ("", [the task])
    by: str = "task"
    checks: list[Check] = field(default_factory=list)
    paper_source: str = ""  # where the paper's numbers come from
    missing_paper: str = "figure only"  # what an empty paper column means
    notes: list[str] = field(default_factory=list)  # what differs from the paper


class Results:
    """Our cells: ``rate(variant_id, task)`` in %, with counts; averages over the layout's tasks."""

    def __init__(self, layout: Layout, cells: dict[tuple[str, str], tuple[int, int]]):
        self.layout, self.cells = layout, cells
        self.tasks = [t for _, ts in layout.rows for t in ts]

    def counts(self, variant: str, task: str) -> tuple[int, int] | None:
        return self.cells.get((variant, task))

    def rate(self, variant: str, task: str) -> float | None:
        c = self.cells.get((variant, task))
        return 100.0 * c[0] / c[1] if c and c[1] else None

    def average(self, variant: str, tasks: list[str] | None = None) -> float | None:
        rates = [self.rate(variant, t) for t in (tasks or self.tasks)]
        return sum(rates) / len(rates) if rates and None not in rates else None

    def paper(self, variant: str, task: str) -> float | None:
        v = next(v for v in self.layout.variants if v.id == variant)
        return v.paper.get(task)

    def paper_average(self, variant: str, tasks: list[str] | None = None) -> float | None:
        printed = next(v for v in self.layout.variants if v.id == variant).paper_average
        if printed is not None and tasks in (None, self.tasks):
            return printed
        values = [self.paper(variant, t) for t in (tasks or self.tasks)]
        return sum(values) / len(values) if values and None not in values else None


def read_cells(layout: Layout, folder_of, finished: set[str]) -> dict[tuple[str, str], tuple[int, int]]:
    """(variant id, task) -> (successes, episodes) from the results.csv of each evaluation stage named
    in ``finished`` (the cells of the others are left out)."""
    cells = {}
    for v in layout.variants:
        if v.stage not in finished:
            continue
        with open(Path(folder_of(v.stage)) / "results.csv") as f:
            for row in csv.DictReader(f):
                cells[(v.id, row["task"])] = (int(row["successes"]), int(row["episodes"]))
    return cells


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _grid(results: Results):
    """(row groups [(heading, [row labels])], column labels, {(row, col): (variant id, task)})."""
    layout = results.layout
    if layout.by == "task":
        cols = [v.label for v in layout.variants]
        cells = {(t, v.label): (v.id, t) for v in layout.variants for _, ts in layout.rows for t in ts}
        return layout.rows, cols, cells
    task = layout.rows[0][1][0]
    rows = list(dict.fromkeys(v.row for v in layout.variants))
    cols = list(dict.fromkeys(v.column for v in layout.variants))
    return [("", rows)], cols, {(v.row, v.column): (v.id, task) for v in layout.variants}


def markdown_table(results: Results) -> str:
    groups, cols, cells = _grid(results)
    layout = results.layout

    def paper_head(col: str) -> str:
        if layout.by == "task":
            variant = next(v for v in layout.variants if v.label == col)
            return "paper" if variant.paper else f"paper: {layout.missing_paper}"
        return "paper" if any(v.paper for v in layout.variants if v.column == col) else f"paper: {layout.missing_paper}"

    lines = ["| " + ("task" if layout.by == "task" else "policy") + " | "
             + " | ".join(f"{c} | {paper_head(c)}" for c in cols) + " |",
             "|---|" + "---:|---:|" * len(cols)]
    for heading, rows in groups:
        if heading:
            lines.append(f"| *{heading}* |" + " | |" * len(cols))
        for r in rows:
            out = []
            for c in cols:
                vid, task = cells.get((r, c), (None, None))
                counts = results.counts(vid, task) if vid else None
                ours = f"{results.rate(vid, task):.1f} ({counts[0]}/{counts[1]})" if counts else ""
                out.append(f"{ours} | {_pct(results.paper(vid, task)) if vid else ''}")
            lines.append(f"| {r} | " + " | ".join(out) + " |")
    if layout.by == "task" and len(results.tasks) > 1:
        avgs = [(f"**{_pct(a)}**" if (a := results.average(v.id)) is not None else "")
                + f" | {_pct(results.paper_average(v.id))}" for v in layout.variants]
        lines.append("| **Average** | " + " | ".join(avgs) + " |")
    return "\n".join(lines) + "\n"


def check_lines(results: Results) -> list[str]:
    lines = []
    for c in results.layout.checks:
        value = c.value(results)
        if value is None:
            lines.append(f"- {c.text}: not measured (a cell is missing)")
        else:
            shown = f"{value:.1f} %" if c.unit == "%" else f"{value:+.1f} {c.unit}"
            lines.append(f"- {c.text}: {shown} (target {c.target()}): **{c.verdict(value)}**")
    return lines


def csv_text(name: str, results: Results) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["experiment", "variant", "label", "task", "successes", "episodes", "rate", "paper_rate"])
    for v in results.layout.variants:
        tasks = [t for t in results.tasks if (v.id, t) in results.cells]
        for t in tasks:
            s, n = results.cells[(v.id, t)]
            paper = results.paper(v.id, t)
            w.writerow([name, v.id, v.label, t, s, n, f"{s / n:.4f}" if n else "",
                        "" if paper is None else f"{paper / 100:.4f}"])
        if results.layout.by == "task" and len(results.tasks) > 1 and tasks:
            avg, paper = results.average(v.id), results.paper_average(v.id)
            s = sum(results.cells[(v.id, t)][0] for t in tasks)
            n = sum(results.cells[(v.id, t)][1] for t in tasks)
            w.writerow([name, v.id, v.label, "average", s, n, "" if avg is None else f"{avg / 100:.4f}",
                        "" if paper is None else f"{paper / 100:.4f}"])
    return buf.getvalue()


def plot(results: Results, path: Path) -> None:
    """Grouped bars: ours per row (task or policy) and column, the paper's number as a black mark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups, cols, cells = _grid(results)
    rows = [r for _, rs in groups for r in rs]
    if results.layout.by == "task" and len(rows) > 1:
        rows = rows + ["Average"]
    fig, ax = plt.subplots(figsize=(min(14.0, 3.0 + 0.5 * len(rows) + 0.12 * len(rows) * len(cols)), 4.5))
    width = 0.8 / len(cols)
    x = np.arange(len(rows))
    for i, c in enumerate(cols):
        ours, paper = [], []
        for r in rows:
            if r == "Average":
                vid = next(v.id for v in results.layout.variants if v.label == c)
                ours.append(results.average(vid))
                paper.append(results.paper_average(vid))
                continue
            vid, task = cells.get((r, c), (None, None))
            ours.append(results.rate(vid, task) if vid else None)
            paper.append(results.paper(vid, task) if vid else None)
        pos = x + (i - (len(cols) - 1) / 2) * width
        ax.bar(pos, [o if o is not None else 0 for o in ours], width, label=c)
        marks = [(p, v) for p, v in zip(pos, paper) if v is not None]
        if marks:
            ax.scatter([p for p, _ in marks], [v for _, v in marks], marker="_", s=160, color="black", zorder=3,
                       label="paper" if i == 0 else None)
    ax.set_xticks(x, rows, rotation=30 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
    ax.set_ylim(0, 105)
    ax.set_ylabel("success rate (%)")
    ax.set_title(results.layout.title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tensorboard(results: Results, folder: Path, text: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for (vid, task) in results.cells:
            writer.add_scalar(f"success/{vid}/{task}", results.rate(vid, task) / 100, 0)
            paper = results.paper(vid, task)
            if paper is not None:
                writer.add_scalar(f"paper/{vid}/{task}", paper / 100, 0)
        if results.layout.by == "task":
            for v in results.layout.variants:
                if results.average(v.id) is not None:
                    writer.add_scalar(f"success/{v.id}/average", results.average(v.id) / 100, 0)
        writer.add_text("results", text, 0)
    finally:
        writer.close()


def write_results(experiment, runner, settings: dict, preset: str, quick: bool) -> str:
    """Write the result files of a run into ``runner.out`` from its finished stages (all of them at the
    end of a run; fewer with ``--report`` during or after a stopped run: the unfinished cells and stage
    times are left empty and the page says so); returns results.md's text."""
    layout = experiment.layout
    finished = {s.name for s in experiment.stages if runner.is_done(s.name)}
    results = Results(layout, read_cells(layout, runner.folder, finished))
    out = runner.out
    stage_times = []  # (name, seconds, projected seconds); seconds None: not finished
    for s in experiment.stages:
        record = (json.loads((runner.folder(s.name) / "stage.json").read_text()) if s.name in finished
                  else {"seconds": None, "projected_seconds": s.estimate})
        stage_times.append((s.name, record["seconds"], record["projected_seconds"]))
    from experiments.runner import format_duration

    unfinished = [n for n, t, _ in stage_times if t is None]
    spent = sum(t for _, t, _ in stage_times if t is not None)
    projected = sum(p for _, t, p in stage_times if t is not None)
    settings_text = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())
    text = [f"# {layout.title}", ""]
    if unfinished:
        text += [f"**Partial results** (`--report`): {len(stage_times) - len(unfinished)} of {len(stage_times)} "
                 f"stages finished; not yet: {', '.join(unfinished)}. Empty cells are not measured yet.", ""]
    text += [f"Preset `{preset}`{' (--quick: a smoke test, not a measurement)' if quick else ''}; settings: {settings_text}. "
             f"Ours: success % (successes/episodes) on the evaluation seeds 100000, 100001, ...; "
             f"paper: {layout.paper_source}", "", markdown_table(results)]
    checks = check_lines(results)
    if checks:
        text += ["## Targets", "", *checks, ""]
    if layout.notes:
        text += ["## What differs from the paper", "", *[f"- {n}" for n in layout.notes], ""]
    text += ["## Time", "",
             f"Stage times summed{' (finished stages)' if unfinished else ''}: {format_duration(spent)} "
             f"(projected {format_duration(projected)}); trainings may have run side by side, so the wall time "
             "can be shorter.", "",
             "| stage | time | projected |", "|---|---:|---:|",
             *[f"| {n} | {'not finished' if t is None else format_duration(t)} | {format_duration(p)} |"
               for n, t, p in stage_times], ""]
    md = "\n".join(text)
    (out / "results.md").write_text(md)
    (out / "results.csv").write_text(csv_text(experiment.name, results))
    plot(results, out / "results.png")
    tensorboard(results, out / "tb", md)
    return md + f"\nwrote {out}/results.md, results.csv, results.png and tb/ (make tensorboard)"
