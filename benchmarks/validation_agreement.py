"""How well the ELPV validation set (drawn cracks of 10-20 % darkening on held-out training cells) ranks settings
as ELPV mono's real test cells do.

Reads rows that earlier runs wrote (nothing is trained): for every flow setting of the exact-objective era (held-out
stop, cap 150) that has both a validation row on that set and test rows on ELPV mono, the mean image AUROC of
three seeds on each, and the score its study ranked it by (the mean of image and pixel AUROC over seeds and then
over the study's three validation sets). Writes a table and the Spearman rank correlations with the test column,
for DADF, FastFlow and both together. Where ``configs/tuning_uncertain_cells_exact.yaml`` has run, the settings'
image AUROC on ELPV mono's uncertain cells (the proposed validation protocol; one seed) is a column too. Where
``configs/tuning_inactive_regions.yaml``'s tally has run, so is their image AUROC on its validation cells with cut-off
dark regions (one seed), and a second table ranks each set against the uncertain cells, as that config's rule reads.

    python benchmarks/validation_agreement.py   # writes benchmarks/results/validation_agreement.md
"""

import argparse
from functools import cache
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
VALIDATION_SET = "ELPV mono, cracks 10-20 %"
TEST_SET = "ELPV mono"
# Rows named after the settings below.
UNCERTAIN_RUN, UNCERTAIN_SET = "tuning_uncertain_cells_exact", "ELPV mono, uncertain cells (validation set)"
INACTIVE_RUN = "tuning_inactive_regions"

# setting: (family, (validation study, its row), (test run, its row))
SETTINGS = {
    "flows on the prior, strides 4-16": (
        "DADF", ("tuning_prior_layers", "DADF, prior (current choice)"),
        ("main", "DADF, flow on prior, exact objective, held-out stop, cap 150"),
    ),
    "strides 4-16, density map": (
        "DADF", ("tuning_density_map", "DADF, prior, density map"), ("ablation_exact", "flow on prior, density map"),
    ),
    "strides 4-16, prior + local": (
        "DADF", ("tuning_views_exact", "DADF, prior + local"), ("ablation_exact", "flow on prior + local"),
    ),
    "strides 4-16, the paper's three views": (
        "DADF", ("tuning_views_exact", "DADF, prior + local + global (the paper's)"),
        ("ablation_exact", "flow on all three (DADF)"),
    ),
    "strides 4-16, pooled 3 x 3": (
        "DADF", ("tuning_prior_pooling", "DADF, strides 4-16, pooled 3 x 3"),
        ("ablation_exact", "DADF, strides 4-16, pooled 3 x 3"),
    ),
    "strides 8-32 (chosen)": (
        "DADF", ("tuning_prior_layers", "DADF, prior, strides 8-32"),
        ("main", "DADF, flow on prior, exact objective, held-out stop, cap 150, strides 8-32"),
    ),
    "strides 8-32, prior + local": (
        "DADF", ("tuning_views_strides", "DADF, strides 8-32, prior + local"),
        ("ablation_exact", "DADF, strides 8-32, prior + local"),
    ),
    "strides 8-32, Lite1 prior": (
        "DADF", ("tuning_prior_backbone", "DADF, Lite1 prior"), ("ablation_exact", "DADF, strides 8-32, Lite1 prior"),
    ),
    "strides 8-32, Lite2 prior": (
        "DADF", ("tuning_prior_backbone", "DADF, Lite2 prior"), ("ablation_exact", "DADF, strides 8-32, Lite2 prior"),
    ),
    "strides 8-32, positions 16": (
        "DADF", ("tuning_flow_positions", "DADF, positions 16"),
        ("ablation_exact", "DADF, strides 8-32, positions 16"),
    ),
    "map from strides 4-16, score from 8-32": (
        "DADF", ("tuning_score_layers", "DADF, map 4-16, score 8-32"), ("ablation_exact", "DADF, map 4-16, score 8-32"),
    ),
    "paper's map, strides 4-16": (
        "FastFlow", ("tuning_density_map", "FastFlow (current choice)"),
        ("main", "TimmFastflow, exact objective, held-out stop, cap 150"),
    ),
    "density map, strides 4-16 (chosen)": (
        "FastFlow", ("tuning_density_map", "FastFlow, density map"),
        ("main", "TimmFastflow, exact objective, held-out stop, cap 150, density map"),
    ),
    "density map, strides 8-32": (
        "FastFlow", ("tuning_prior_layers", "FastFlow, strides 8-32"), ("ablation_exact", "TimmFastflow, strides 8-32"),
    ),
}


@cache
def results(run: str) -> pd.DataFrame:
    """A run's rows, read once however many settings draw on it."""
    return pd.read_csv(RESULTS / run / "results.csv")


def image_auroc(run: str, model: str, data: str, seed: int | None = None) -> tuple[float, int]:
    """Mean image AUROC of one model's rows on one data set of a run (of one seed, if given), and how many seeds it
    averages."""
    rows = results(run)
    rows = rows[(rows["model"] == model) & (rows["data"] == data) & ((rows["seed"] == seed) if seed is not None else True)]
    if rows.empty:
        msg = f"No rows of '{model}' on '{data}' in {RESULTS / run / 'results.csv'}."
        raise ValueError(msg)
    return float(rows["image_AUROC"].mean()), len(rows)


def rule_score(study: str, model: str) -> float:
    """The studies' ranking score: image and pixel AUROC averaged, over the seeds, then over the validation sets."""
    rows = results(study)
    rows = rows[rows["model"] == model]
    return float(((rows["image_AUROC"] + rows["pixel_AUROC"]) / 2).groupby(rows["data"]).mean().mean())


def one_seed_column(run: str, data: str | None = None) -> dict[str, float]:
    """Each setting's image AUROC in a run named after the settings, on ``data`` (or the run's only data set); empty
    where the run has not been written."""
    if not (RESULTS / run / "results.csv").is_file():
        return {}
    rows = results(run)
    if data is None and rows["data"].nunique() != 1:
        msg = f"{RESULTS / run / 'results.csv'} should hold one data set, not {sorted(rows['data'].unique())}."
        raise ValueError(msg)
    rows = rows if data is None else rows[rows["data"] == data]
    return rows.groupby("model")["image_AUROC"].mean().to_dict()


def agreement() -> pd.DataFrame:
    """One row per setting: family, validation image AUROC (mean and seed 0), its study's score, the image AUROC on
    the uncertain cells and on the cut-off regions (NaN where not run), test image AUROC, the seeds."""
    uncertain, inactive = one_seed_column(UNCERTAIN_RUN, UNCERTAIN_SET), one_seed_column(INACTIVE_RUN)
    rows = []
    for setting, (family, (study, validated), (run, tested)) in SETTINGS.items():
        validation, validation_seeds = image_auroc(study, validated, VALIDATION_SET)
        first_seed = image_auroc(study, validated, VALIDATION_SET, seed=0)[0]
        test, test_seeds = image_auroc(run, tested, TEST_SET)
        rows.append({"family": family, "setting": setting, "validation": validation, "seed 0": first_seed,
                     "rule": rule_score(study, validated), "uncertain": uncertain.get(setting, float("nan")),
                     "inactive": inactive.get(setting, float("nan")), "test": test,
                     "seeds": f"{validation_seeds} / {test_seeds}"})
    return pd.DataFrame(rows)


def number(value: float, form: str) -> str:
    """A value as ``form`` formats it, or a dash where there is none (a setting not run on the uncertain cells)."""
    return "-" if pd.isna(value) else format(value, form)


def report(table: pd.DataFrame) -> str:
    """The table and the rank correlations, as Markdown."""
    lines = [
        "# The ELPV validation set against ELPV mono's test cells (`python benchmarks/validation_agreement.py`)",
        "",
        f"Image AUROC, mean of the seeds: validation = '{VALIDATION_SET}' (drawn cracks on held-out training cells),",
        f"test = '{TEST_SET}' (real cells). Rows are read from `benchmarks/results/<run>/results.csv`; nothing is trained.",
        "",
        ("| family | setting | validation | study's score | uncertain cells (1 seed) | cut-off regions (1 seed) | test "
         "| seeds (validation / test) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table.sort_values(["family", "validation"], ascending=[True, False]).itertuples():
        lines.append(
            f"| {row.family} | {row.setting} | {row.validation:.3f} | {row.rule:.3f} | {number(row.uncertain, '.3f')} "
            f"| {number(row.inactive, '.3f')} | {row.test:.3f} | {row.seeds} |",
        )
    lines += [
        "",
        "| settings | n | Spearman (validation, test) | Spearman (study's score, test) | n, Spearman (uncertain cells, test) |",
        "|---|---|---|---|---|",
    ]
    for name, part in [*table.groupby("family"), ("both", table)]:
        by_set, by_rule, by_cells = (
            part[column].corr(part["test"], method="spearman") for column in ("validation", "rule", "uncertain")
        )
        cells = part["uncertain"].notna().sum()
        lines.append(f"| {name} | {len(part)} | {by_set:+.2f} | {by_rule:+.2f} | {cells}, {number(by_cells, '+.2f')} |")
    both = table.dropna(subset=["uncertain", "inactive"])
    if not both.empty:
        lines += [
            "",
            (f"Against the uncertain cells, over the {len(both)} settings run on both one-seed sets "
             "(configs/tuning_inactive_regions.yaml's rule):"),
            "",
            "| set | Spearman with the uncertain cells | Spearman with the test cells |",
            "|---|---|---|",
        ]
        for column, name in (("validation", "drawn cracks, mean of 3 seeds"), ("seed 0", "drawn cracks, seed 0"),
                             ("inactive", "cut-off regions, seed 0")):
            by_cells, by_test = (both[column].corr(both[other], method="spearman") for other in ("uncertain", "test"))
            lines.append(f"| {name} | {by_cells:+.2f} | {by_test:+.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS / "validation_agreement.md")
    arguments = parser.parse_args()
    text = report(agreement())
    arguments.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
