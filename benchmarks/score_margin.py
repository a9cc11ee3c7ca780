"""Tuning study of ``score_margin``: image AUROC of one fit per set and seed, scored with each candidate margin.

``score_margin`` only changes where the image score is read from the anomaly map, not what is trained, so each
(data set, seed) of the config is fitted once, as the benchmark fits it (``anomalib_dadf.benchmark.job.build``),
and its test split (on validation sets: held-out training images and their anomalous copies) is predicted once
per margin through the model's own scoring: its anomaly map generator rebuilt with that margin. Scores are raw,
before the post-processor, whose normalisation keeps their order anyway. Each kind of anomaly (the test split's
folders) also gets its own AUROC against the normal images. Rows are appended to ``results.csv`` as they come,
so a stopped run keeps what it finished; ``summary.md`` ranks the margins by the rule in the config's notes:
the smallest margin whose image AUROC, averaged over the seeds and then over the sets, is within ``tolerance``
of the best margin's.

    HF_HUB_OFFLINE=1 python benchmarks/score_margin.py --config configs/tuning_score_margin.yaml
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from sklearn.metrics import roc_auc_score

from anomalib_dadf.anomaly_map import AnomalyMapGenerator
from anomalib_dadf.benchmark.job import DadfBenchmarkJobGenerator, build


def with_margin(generator: AnomalyMapGenerator, hparams: dict, margin: float) -> AnomalyMapGenerator:
    """The model's anomaly map generator, the same but for ``margin``."""
    rebuilt = AnomalyMapGenerator(
        generator.input_size,
        kind=generator.kind,
        map_scales=generator.map_scales,
        score_scales=generator.score_scales,
        score_top_fraction=hparams.get("score_top_fraction"),
        sigma=hparams.get("map_sigma", 0.0),
        score_margin=margin,
    )
    rebuilt.load_state_dict(generator.state_dict())
    return rebuilt


def predict(engine: Engine, model: torch.nn.Module, datamodule: object) -> tuple[np.ndarray, np.ndarray]:
    """Raw image scores of the test split and each image's kind (its folder: ``good`` for normal images)."""
    batches = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    scores = torch.cat([batch.pred_score.flatten() for batch in batches]).numpy()
    kinds = np.array([Path(path).parent.name for batch in batches for path in batch.image_path])
    return scores, kinds


def aurocs(scores: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """Image AUROC of all anomalous images, and of each kind alone, against the normal ones."""
    normal = kinds == "good"
    values = {"image_AUROC": roc_auc_score(~normal, scores)}
    for kind in sorted(set(kinds) - {"good"}):
        chosen = normal | (kinds == kind)
        values[f"image_AUROC/{kind}"] = roc_auc_score(kinds[chosen] == kind, scores[chosen])
    return values


def run(spec: dict, margins: list[float], output: Path) -> None:
    """Fit one (set, seed), score it with every margin and append a row per margin to ``output``."""
    seed_everything(spec["seed"])
    datamodule, model, trainer_arguments = build(spec)
    with tempfile.TemporaryDirectory() as scratch:
        engine = Engine(accelerator=spec["accelerator"], devices=1, default_root_dir=scratch, logger=False, **trainer_arguments)
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        fit_s = time.perf_counter() - start
        model.post_processor.enable_normalization = model.post_processor.enable_thresholding = False
        for margin in margins:
            model.model.anomaly_map_generator = with_margin(model.model.anomaly_map_generator, model.hparams, margin)
            row = {"data": spec["data"]["name"], "model": spec["model"]["name"], "seed": spec["seed"],
                   "score_margin": margin, "fit_s": fit_s, **aurocs(*predict(engine, model, datamodule))}
            print(row, flush=True)
            earlier = pd.read_csv(output) if output.exists() else pd.DataFrame()
            # Sets differ in their kinds of anomaly: the union of their columns, each value under its own name.
            pd.concat([earlier, pd.DataFrame([row])], ignore_index=True).to_csv(output, index=False)


def summarise(results: Path, tolerance: float) -> str:
    """Mean image AUROC per set and margin (over seeds), the mean over sets and the margin the rule chooses."""
    rows = pd.read_csv(results)
    per_set = rows.groupby(["score_margin", "data"])["image_AUROC"].agg(["mean", "std", "count"])
    table = per_set["mean"].unstack("data")
    table["mean over sets"] = table.mean(axis=1)
    best = table["mean over sets"].max()
    chosen = min(margin for margin, value in table["mean over sets"].items() if value >= best - tolerance)
    kinds = rows.filter(like="image_AUROC/").columns
    lines = [
        "| score_margin | " + " | ".join(table.columns) + " |",
        "|---|" + "---|" * len(table.columns),
        *(f"| {margin:g} | " + " | ".join(f"{value:.4f}" for value in values) + " |" for margin, values in table.iterrows()),
        "",
        (
            f"Seeds per cell: {per_set['count'].min()}-{per_set['count'].max()}. Chosen by the rule (the smallest margin "
            f"within {tolerance} of the best mean over sets, {best:.4f}): **score_margin {chosen:g}**."
        ),
        "",
        "Image AUROC of each kind of anomaly alone against the normal images (mean over seeds):",
        "",
        rows.groupby(["data", "score_margin"])[list(kinds)].mean().round(4).to_markdown(),
        "",
        "Standard deviation over seeds of the image AUROC:",
        "",
        per_set["std"].unstack("data").round(4).to_markdown(),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", nargs="+", help="data sets of the config, by name (default: all)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="only write summary.md from results.csv")
    arguments = parser.parse_args()
    config = yaml.safe_load(arguments.config.read_text())
    output = Path(config["output"])
    output.mkdir(parents=True, exist_ok=True)
    if not arguments.report_only:
        jobs = DadfBenchmarkJobGenerator(data=arguments.data, first_seed=arguments.first_seed).generate_jobs(config)
        for job in jobs:
            run(job.spec, config["score_margins"], output / "results.csv")
    summary = f"# {config['title']}\n\n{config['notes']}\n\n" + summarise(output / "results.csv", config["tolerance"])
    (output / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
