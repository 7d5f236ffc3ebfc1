"""Charts as inline SVG text: drawn here rather than with matplotlib, so a page stays small, sharp at any zoom and
readable without any request or script."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Sequence

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
W, H, PAD_L, PAD_R, PAD_T, PAD_B = 430, 300, 64, 12, 26, 40


@dataclass
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float]
    dashed: bool = False
    color: str | None = None


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _ticks(low: float, high: float, n: int = 5) -> list[float]:
    if high <= low:
        return [low]
    return [low + (high - low) * i / (n - 1) for i in range(n)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


class Plot:
    """One chart's frame: axes from ``x`` and ``y`` ranges, a title, then lines, points, bars and a legend."""

    def __init__(self, title: str, x: tuple[float, float], y: tuple[float, float], xlabel: str, ylabel: str) -> None:
        self.x, self.y = x, y
        self.parts = [f'<text x="{W / 2}" y="16" text-anchor="middle" class="t">{escape(title)}</text>',
                      f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" class="frame"/>',
                      f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle">{escape(xlabel)}</text>',
                      f'<text x="12" y="{H / 2}" text-anchor="middle" transform="rotate(-90 12 {H / 2})">{escape(ylabel)}</text>']
        for t in _ticks(*x):
            self.parts.append(f'<text x="{self.px(t):.1f}" y="{H - PAD_B + 14}" text-anchor="middle">{_fmt(t)}</text>')
        for t in _ticks(*y):
            self.parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{self.py(t):.1f}" y2="{self.py(t):.1f}" class="grid"/>'
                              f'<text x="{PAD_L - 4}" y="{self.py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        self.legend: list[tuple[str, str, bool]] = []

    def px(self, v: float) -> float:
        span = (self.x[1] - self.x[0]) or 1.0
        return PAD_L + (v - self.x[0]) / span * (W - PAD_L - PAD_R)

    def py(self, v: float) -> float:
        span = (self.y[1] - self.y[0]) or 1.0
        return H - PAD_B - (v - self.y[0]) / span * (H - PAD_T - PAD_B)

    def line(self, s: Series, i: int, step: bool = False) -> None:
        stroke = s.color or color(i)
        points = []
        for k, (x, y) in enumerate(zip(s.xs, s.ys)):
            if step and k:
                points.append(f"{self.px(x):.1f},{self.py(s.ys[k - 1]):.1f}")
            points.append(f"{self.px(x):.1f},{self.py(y):.1f}")
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        self.parts.append(f'<polyline fill="none" stroke="{stroke}" stroke-width="1.6"{dash} points="{" ".join(points)}">'
                          f"<title>{escape(s.name)}</title></polyline>")
        self.legend.append((s.name, stroke, s.dashed))

    def bar(self, x0: float, x1: float, y: float, fill: str, tip: str) -> None:
        top, base = self.py(y), self.py(self.y[0])
        self.parts.append(f'<rect x="{self.px(x0):.1f}" y="{top:.1f}" width="{max(self.px(x1) - self.px(x0) - 1, 0.5):.1f}" '
                          f'height="{max(base - top, 0):.1f}" fill="{fill}" opacity="0.75"><title>{escape(tip)}</title></rect>')

    def vline(self, x: float, label: str) -> None:
        right = self.px(x) > (PAD_L + W - PAD_R) / 2  # the label goes on the side with room
        self.parts.append(f'<line x1="{self.px(x):.1f}" x2="{self.px(x):.1f}" y1="{PAD_T}" y2="{H - PAD_B}" class="mark"/>'
                          f'<text x="{self.px(x) + (-3 if right else 3):.1f}" y="{PAD_T + 12}" text-anchor="{"end" if right else "start"}" '
                          f'class="marktext">{escape(label)}</text>')

    def svg(self, label: str, legend_columns: int = 1, left: bool = False) -> str:
        rows = []
        if len(self.legend) > 12:  # too many to read: the lines carry their names on hover, and the table beside lists them
            self.legend = []
        for k, (name, stroke, dashed) in enumerate(self.legend):
            col, row = k % legend_columns, k // legend_columns
            x = PAD_L + 6 + 150 * col if left else W - PAD_R - 150 * (legend_columns - col)
            y = H - PAD_B - 8 - 13 * (len(self.legend) // legend_columns - row)
            dash = ' stroke-dasharray="5 3"' if dashed else ""
            rows.append(f'<line x1="{x}" x2="{x + 16}" y1="{y - 4}" y2="{y - 4}" stroke="{stroke}" stroke-width="2"{dash}/>'
                        f'<text x="{x + 20}" y="{y}">{escape(name[:22])}</text>')
        return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
                f'aria-label="{escape(label)}" class="chart">{"".join(self.parts)}{"".join(rows)}</svg>')


def line_chart(title: str, series: list[Series], xlabel: str, ylabel: str, mark: tuple[float, str] | None = None,
               y_range: tuple[float, float] | None = None) -> str:
    """Lines over a shared x axis (e.g. epochs), with an optional vertical marker (the best epoch)."""
    xs = [x for s in series for x in s.xs]
    ys = [y for s in series for y in s.ys if y == y]
    lo, hi = y_range or ((min(ys), max(ys)) if ys else (0.0, 1.0))
    if hi == lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    plot = Plot(title, (min(xs, default=0), max(xs, default=1)), (lo, hi), xlabel, ylabel)
    for i, s in enumerate(series):
        plot.line(s, i)
    if mark is not None:
        plot.vline(*mark)
    return plot.svg(title)


def reliability_chart(bins: list, ece: float) -> str:
    """Accuracy per confidence bin as bars, the diagonal of perfect calibration, and each bin's count on hover."""
    plot = Plot(f"Reliability (ECE {ece:.2%})", (0.0, 1.0), (0.0, 1.0), "confidence", "accuracy")
    for b in bins:
        if b.images:
            plot.bar(b.low, b.high, b.accuracy, "#1f77b4", f"confidence {b.low:.2f}-{b.high:.2f}: {b.images:,} images, "
                     f"accuracy {b.accuracy:.2%}, mean confidence {b.confidence:.2%}")
    plot.line(Series("perfect calibration", [0, 1], [0, 1], dashed=True, color="#888"), 0)
    plot.legend.clear()  # the note under the heading names the diagonal; a legend would cover the bars
    return plot.svg("reliability diagram")


def pr_chart(curves: list[tuple[str, list[float], list[float]]]) -> str:
    """One-vs-rest precision-recall curves (recall on x), one colour per label."""
    plot = Plot("Precision-recall, one vs rest", (0.0, 1.0), (0.0, 1.0), "recall", "precision")
    for i, (name, recall, precision) in enumerate(curves):
        plot.line(Series(name, recall, precision), i, step=True)
    return plot.svg("precision-recall curves", legend_columns=2 if len(curves) > 6 else 1, left=True)
