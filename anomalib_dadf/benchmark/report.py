"""The benchmark's CSV, Markdown table and plot."""

from pathlib import Path

import matplotlib as mpl
import pandas as pd

mpl.use("Agg")
from matplotlib import pyplot as plt

from anomalib_dadf.metrics import HELD_OUT_FLOW_NLL

from .job import METRICS

# Test metrics, and what a flow model's training says about held-out normal images (lower is better).
SCORES = [*METRICS, HELD_OUT_FLOW_NLL]
LOWER_IS_BETTER = {HELD_OUT_FLOW_NLL}
COSTS = ["fit_s", "test_s", "ms_per_image", "peak_rss_mib", "trainable_params", "train_images", "epochs"]
GROWTH = {"fit_s": "fit seconds", "ms_per_image": "test ms per image", "peak_rss_mib": "peak memory, MiB"}


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every metric and cost, per data set and model."""
    columns = [column for column in SCORES + COSTS if column in results]
    grouped = results.groupby(["data", "model"], sort=False)[columns]
    summary = grouped.mean().join(grouped.std(ddof=0), rsuffix="_std")
    summary["seeds"] = grouped.size()
    return summary.reset_index()


def _cell(row: pd.Series, column: str) -> str:
    value = row.get(column)
    if value is None or pd.isna(value):
        return "–"  # noqa: RUF001  (an en dash marks an empty cell in the Markdown tables)
    if column in SCORES:
        spread = row.get(f"{column}_std")
        return f"{value:.3f} ± {spread:.3f}" if row["seeds"] > 1 else f"{value:.3f}"
    if column == "trainable_params":
        return f"{value / 1e6:.2f} M"
    if column in {"train_images", "epochs"}:
        return f"{value:.0f}"
    return f"{value:.1f}" if column != "peak_rss_mib" else f"{value:.0f}"


def markdown(summary: pd.DataFrame) -> str:
    """One table row per data set and model: mean ± std over seeds."""
    columns = [column for column in SCORES + COSTS if column in summary and summary[column].notna().any()]
    header = ["data", "model", "seeds", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [str(row["data"]), str(row["model"]), str(int(row["seeds"])), *(_cell(row, c) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ranking(summary: pd.DataFrame, metrics: list[str]) -> str:
    """Models ranked by the mean over data sets of the mean of ``metrics`` (each itself a mean over seeds).

    The best comes first: the highest score, or the lowest when every metric is one where lower is better. A model
    not yet run on every data set is listed after the ranked ones, unranked, with how many it ran on: its mean is
    over other sets, so it cannot be compared.

    Raises:
        ValueError: ``metrics`` mixes metrics where higher is better with ones where lower is.
    """
    lower = {metric in LOWER_IS_BETTER for metric in metrics}
    if len(lower) > 1:
        msg = f"Cannot rank by {metrics}: {sorted(LOWER_IS_BETTER)} are better when lower, the others when higher."
        raise ValueError(msg)
    score = summary[metrics].mean(axis=1).groupby(summary["model"], sort=False).mean().sort_values(ascending=lower.pop())
    sets, every_set = summary.groupby("model", sort=False)["data"].nunique(), summary["data"].nunique()
    complete = sets[score.index] == every_set
    lines = ["| rank | model | score |", "|---|---|---|"]
    # Four digits: the studies' rules ask a lead of 0.005, and candidates often land within 0.001 of the choice.
    lines += [
        f"| {rank} | {model} | {value:.4f} |" for rank, (model, value) in enumerate(score[complete].items(), start=1)
    ]
    lines += [
        f"| none | {model} (on {sets[model]} of {every_set} data sets, not ranked) | {value:.4f} |"
        for model, value in score[~complete].items()
    ]
    return "\n".join(lines)


def plot(summary: pd.DataFrame, path: Path) -> None:
    """Image AUROC per data set, one bar per model, with the spread over seeds."""
    data, models = list(dict.fromkeys(summary["data"])), list(dict.fromkeys(summary["model"]))
    width = 0.8 / len(models)
    figure, axis = plt.subplots(figsize=(2.2 * len(data) + 2, 4))
    for index, model in enumerate(models):
        rows = summary[summary["model"] == model].set_index("data").reindex(data)
        positions = [position + (index - (len(models) - 1) / 2) * width for position in range(len(data))]
        axis.bar(positions, rows["image_AUROC"], width, yerr=rows.get("image_AUROC_std"), capsize=3, label=model)
    axis.set_xticks(range(len(data)), data)
    axis.set_ylabel("image AUROC (mean ± std over seeds)")
    axis.set_ylim(0.4, 1.0)
    axis.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
    axis.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_growth(summary: pd.DataFrame, path: Path) -> None:
    """Fit time, test time per image and peak memory against the number of training images, log-log, a line per model."""
    figure, axes = plt.subplots(1, len(GROWTH), figsize=(4.2 * len(GROWTH), 3.8))
    for axis, (column, label) in zip(axes, GROWTH.items(), strict=True):
        for model, rows in summary.sort_values("train_images").groupby("model", sort=False):
            axis.plot(rows["train_images"], rows[column], marker="o", label=model)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("training images")
        axis.set_ylabel(label)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(
    results: pd.DataFrame,
    output: Path,
    header: str,
    rank_by: list[str] | None = None,
    growth: bool = False,
) -> Path:
    """Write ``summary.md`` and ``image_auroc.png`` of ``results`` (one row per run) into ``output``.

    With ``rank_by`` (metric names), ``summary.md`` also ranks the models by :func:`ranking`; with
    ``growth`` it shows ``cost_growth.png`` (:func:`plot_growth`), for data sets that differ in size.
    """
    output.mkdir(parents=True, exist_ok=True)
    summary = summarise(results)
    errors = results[results["error"].notna()] if "error" in results else results.iloc[0:0]
    failed = [f"- {row.data} / {row.model} / seed {row.seed}: {row.error}" for row in errors.itertuples()]
    text = f"{header}\n\n{markdown(summary)}\n"
    if "image_AUROC" in summary:
        plot(summary, output / "image_auroc.png")
        text += "\n![image AUROC](image_auroc.png)\n"
    if rank_by:
        text += f"\nRanking by the mean of {', '.join(rank_by)} over the data sets:\n\n{ranking(summary, rank_by)}\n"
    if growth:
        plot_growth(summary, output / "cost_growth.png")
        text += "\n![cost growth](cost_growth.png)\n"
    if failed:
        text += "\nFailed runs:\n\n" + "\n".join(failed) + "\n"
    (output / "summary.md").write_text(text)
    return output / "summary.md"
