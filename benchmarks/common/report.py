"""Small pieces of the markdown reports and plots: number formatting, and figures written safely.

What a report says is its runner's business (``reports/<runner>.py``); these are the formatting rules the reports
share, so that a missing value, an interval or a figure looks the same in every report. Figures are drawn with
matplotlib's Agg backend (no display needed) and written atomically, so an interrupted run never leaves half a PNG;
without matplotlib `pyplot` raises ImportError, which the reports turn into a "plot skipped" line.
"""

from __future__ import annotations

import math
from pathlib import Path

from neuron_peft.fileio import atomic_path


def fmt(x, nd=2) -> str:
    """``x`` with ``nd`` decimals; "n/a" for None or NaN."""
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def fmt_ci(x) -> str:
    """A signed interval ``[lo, hi]`` with 2 decimals."""
    return f"[{x[0] + 0.0:+.2f}, {x[1] + 0.0:+.2f}]"  # + 0.0 turns -0.0 into 0.0


def fmt_pm(x, nd=3) -> str:
    """``mean ± half-width`` from ``[mean, half-width]`` (the half-width left out when it is not finite)."""
    if not x:
        return "n/a"
    return f"{x[0]:.{nd}f}" + ("" if not math.isfinite(x[1]) else f" ± {x[1]:.{nd}f}")


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (110 dpi) and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
