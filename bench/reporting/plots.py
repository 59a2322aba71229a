"""The report's PNG plots (matplotlib, no display): total PSS and requests/s against the
number of workers, one line per contender, one figure per model and measure."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(report, model: str, path: str, ylabel: str, out: pathlib.Path,
              skip_embedded: bool = False) -> str | None:
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    drawn = False
    for contender in report.contenders:
        if skip_embedded and contender in ("workerpool-pool", "multiprocessing"):
            continue
        points = [(n, report.value(model, contender, n, path)) for n in report.workers]
        points = [(n, v) for n, v in points if v is not None]
        if points:
            bold = contender in ("workerpool", "workerpool-pool")
            axes.plot(*zip(*points), marker="o", linewidth=2.6 if bold else 1.4,
                      label=report.name(contender))
            drawn = True
    if not drawn:
        plt.close(figure)
        return None
    axes.set_xlabel("workers (N)")
    axes.set_xticks(report.workers)
    axes.set_ylabel(ylabel)
    axes.set_title(f"{model}: {ylabel}")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    name = f"report-{model}-{path.split('.')[0]}.png"
    figure.savefig(out / name)
    plt.close(figure)
    return name


def draw(report, out: pathlib.Path) -> dict[str, list[str]]:
    """{model: [png file names]} written into ``out``."""
    plots = {}
    for model in report.models:
        names = [line_plot(report, model, "pss_mib", "total PSS (MiB)", out),
                 line_plot(report, model, "load.rps", "requests/s at 32 clients", out,
                           skip_embedded=True)]
        plots[model] = [n for n in names if n]
    return plots
