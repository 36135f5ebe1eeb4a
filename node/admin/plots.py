"""The log p(x) plot of a series: one point per slice and the threshold line.

The plot answers the reviewer's first question (is this one bad slice or a run of them, and
how far below the line?) faster than a table. It is drawn with matplotlib's object API on the
Agg canvas, never pyplot: pyplot keeps global figure state, and the dashboard renders from
several request threads at once.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

NORMAL_COLOUR = "#3b7dd8"
ABNORMAL_COLOUR = "#d62728"


def plot_slice_scores(
    indexes: Sequence[int],
    log_likelihoods: Sequence[float],
    abnormal: Sequence[bool],
    threshold: float | None,
    title: str = "",
    threshold_label: str = "threshold",
) -> bytes:
    """Draw log p(x) against slice index, flagged slices in red, and the threshold.

    Args:
        indexes: slice positions along the stack (x axis).
        log_likelihoods: log p(x) per slice, same order.
        abnormal: the verdict per slice, same order.
        threshold: the threshold on log p(x) applied to the series; None draws no line.
        title: a caption above the plot.
        threshold_label: what the line is called in the legend (a station's image edge
            judges the slices of a series it calls normal in place of the threshold).

    Returns:
        PNG bytes.

    Raises:
        ValueError: the sequences differ in length.
    """
    if not len(indexes) == len(log_likelihoods) == len(abnormal):
        raise ValueError("indexes, log_likelihoods and abnormal must have the same length")
    fig = Figure(figsize=(8.0, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(indexes, log_likelihoods, color="#999999", linewidth=0.8, zorder=1)
    points = list(zip(indexes, log_likelihoods, abnormal, strict=True))
    normal_pts = [(i, v) for i, v, a in points if not a]
    flagged_pts = [(i, v) for i, v, a in points if a]
    if normal_pts:
        xs, ys = zip(*normal_pts, strict=True)
        ax.scatter(xs, ys, s=12, color=NORMAL_COLOUR, label="normal", zorder=2)
    if flagged_pts:
        xs, ys = zip(*flagged_pts, strict=True)
        ax.scatter(xs, ys, s=18, color=ABNORMAL_COLOUR, label="flagged", zorder=3)
    if threshold is not None:
        ax.axhline(threshold, color=ABNORMAL_COLOUR, linestyle="--", linewidth=1.0,
                   label=f"{threshold_label} {threshold:.4g}")
    ax.set_xlabel("slice")
    ax.set_ylabel("log p(x)")
    if title:
        ax.set_title(title, fontsize=10)
    if indexes:
        ax.legend(loc="lower left", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
