"""The pure side of the benchmark: figures beside their ceilings, targets, percentiles, and the
Markdown, JSON and PNG files they are written to. No servers here, so it is tested on its own."""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["ratio", "value"]
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


@dataclass(frozen=True)
class Target:
    """A target of the issue: on the ratio to the ceiling, or on the figure itself."""

    kind: Kind
    op: str
    bound: float

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"unknown comparison {self.op!r}; one of {', '.join(_OPS)}")

    def describe(self) -> str:
        what = "ratio" if self.kind == "ratio" else "figure"
        return f"{what} {self.op} {self.bound:g}"

    def met_by(self, value: float | None, ratio_: float | None) -> bool | None:
        subject = ratio_ if self.kind == "ratio" else value
        if subject is None or math.isnan(subject):
            return None
        return _OPS[self.op](subject, self.bound)


@dataclass
class Figure:
    """One measured figure, beside the ceiling it is compared with in the same run."""

    part: str
    name: str
    value: float | None
    unit: str
    ceiling: float | None = None
    ceiling_name: str = ""
    targets: tuple[Target, ...] = ()
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return ratio(self.value, self.ceiling)

    @property
    def met(self) -> bool | None:
        """All targets met; None without targets or when a figure is missing."""
        verdicts = [t.met_by(self.value, self.ratio) for t in self.targets]
        if not verdicts or None in verdicts:
            return None
        return all(verdicts)

    @property
    def target_text(self) -> str:
        return " and ".join(t.describe() for t in self.targets)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["targets"] = self.target_text or None
        data["ratio"] = self.ratio
        data["met"] = self.met
        return data


def ratio(value: float | None, ceiling: float | None) -> float | None:
    """value / ceiling; None when either is missing or the ceiling is not positive."""
    if value is None or ceiling is None or ceiling <= 0:
        return None
    return value / ceiling


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_summary(ms: Sequence[float]) -> dict[str, float]:
    """p50, p99, p99.9 and max of latencies in milliseconds."""
    return {
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "p99.9": percentile(ms, 99.9),
        "max": max(ms),
        "count": float(len(ms)),
    }


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def _verdict(met: bool | None, targets: tuple[Target, ...]) -> str:
    if not targets:
        return ""
    return {True: "met", False: "**missed**", None: "n/a"}[met]


def markdown_table(figures: Iterable[Figure]) -> str:
    """One row per figure: the figure, its ceiling, the ratio, the issue's target, met/missed."""
    lines = [
        "| part | figure | value | ceiling (same run) | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        ceiling = "" if f.ceiling is None else f"{_fmt(f.ceiling, f.unit)} ({f.ceiling_name})"
        name = f.name + (f" — {f.note}" if f.note else "")
        row = [
            f.part,
            name.replace("|", "/"),
            _fmt(f.value, f.unit),
            ceiling.replace("|", "/"),
            "" if f.ratio is None else f"{f.ratio:.2f}",
            f.target_text,
            _verdict(f.met, f.targets),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: Path, figures: Sequence[Figure], meta: dict[str, Any], notes: Sequence[str]
) -> tuple[Path, Path]:
    """results.md and results.json in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    header = [
        "# Benchmark results",
        "",
        ", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, dict | list)),
        "",
    ]
    body = markdown_table(figures)
    tail = ["", *(f"- {n}" for n in notes)] if notes else []
    md.write_text("\n".join(header) + "\n" + body + "\n".join(tail) + "\n", encoding="utf-8")
    js = out_dir / "results.json"
    document = {"meta": meta, "notes": list(notes), "figures": [f.as_dict() for f in figures]}
    js.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return md, js


def write_plots(out_dir: Path, figures: Sequence[Figure]) -> list[Path]:
    """throughput.png (each rate beside its ceiling) and latency.png (percentiles by load).
    Needs matplotlib (the ``bench`` extra); without it, no plots and an empty list."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []
    rates = [f for f in figures if f.unit.endswith("/s") and f.value is not None]
    if rates:
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(rates) + 1.5))
        names = [f"({f.part}) {f.name}" for f in rates]
        ys = list(range(len(rates)))
        ax.barh([y + 0.2 for y in ys], [f.value or 0 for f in rates], 0.4, label="measured")
        ax.barh(
            [y - 0.2 for y in ys], [f.ceiling or 0 for f in rates], 0.4, label="ceiling (same run)"
        )
        ax.set_yticks(ys, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("per second")
        ax.legend(loc="lower right")
        fig.tight_layout()
        path = out_dir / "throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    loads = [f for f in figures if "offered_per_s" in f.extra]
    if loads:
        loads = sorted(loads, key=lambda f: float(f.extra["offered_per_s"]))
        xs = [float(f.extra["offered_per_s"]) for f in loads]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in ("p50", "p99", "p99.9"):
            ax.plot(xs, [float(f.extra[key]) for f in loads], marker="o", label=key)
        ax.set_xlabel("offered load (intents/s, open loop)")
        ax.set_ylabel("enqueue commit to read_committed consumer (ms)")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        path = out_dir / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made
