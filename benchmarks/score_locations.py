"""Where each test image's score comes from: the place its anomaly map peaks.

The image score of DADF and FastFlow is the maximum of the anomaly map; PatchCore's is its reweighted
nearest-neighbour distance, and its map is blurred. This fits models of a benchmark config on one data
set (seed 0, the benchmark's own input size and pre-processing), predicts the test set, and reports
per model: the image AUROC of the model's own score and of its map's maximum; the share of normal and
of anomalous images whose map peaks in the border band (the outer ``--margin`` of each side); the
AUROC of the map's maximum inside or outside the band only; and the AUROC of the maximum after each
position of the map is standardised by the mean and spread of the held-out normal cells' maps there
(the validation split's normal images, never fitted on). It reads test data and chooses nothing: it
says where a model's false alarms lie, and whether calibrating positions would remove them.
Maps and scores are the models' raw outputs, before anomalib's post-processor.

    HF_HUB_OFFLINE=1 python benchmarks/score_locations.py --config configs/benchmark.yaml --data 'ELPV mono' \\
        --models 'DADF, flow on prior' 'PatchCore (coreset 0.01)'   # writes benchmarks/results/score_locations.md
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from sklearn.metrics import roc_auc_score

from anomalib_dadf.benchmark.job import DadfBenchmarkJobGenerator, build

RESULTS = Path(__file__).parent / "results"


def peaks(spec: dict, margin: float) -> dict[str, float]:
    """Fit one model, predict its test set and summarise where the maps peak."""
    seed_everything(spec["seed"])
    datamodule, model, trainer_arguments = build(spec)
    with tempfile.TemporaryDirectory() as scratch:
        engine = Engine(accelerator=spec["accelerator"], devices=1, default_root_dir=scratch, logger=False, **trainer_arguments)
        engine.fit(model=model, datamodule=datamodule)
        # Raw maps: min-max normalisation clamps at 0 and 1, and a clamped plateau would move argmax to its first pixel.
        model.post_processor.enable_normalization = model.post_processor.enable_thresholding = False
        maps, labels, scores = collect(engine.predict(model=model, dataloaders=datamodule.test_dataloader()))
        held_out, held_out_labels, _ = collect(engine.predict(model=model, dataloaders=datamodule.val_dataloader()))
    held_out_normal = held_out[~held_out_labels]
    z_scores = (maps - held_out_normal.mean(dim=0)) / held_out_normal.std(dim=0).clamp_min(1e-6)
    height, width = maps.shape[-2:]
    band = torch.ones(height, width, dtype=torch.bool)
    rows, columns = round(margin * height), round(margin * width)
    band[rows : height - rows, columns : width - columns] = False
    flat, band = maps.flatten(1), band.flatten()
    at_border = band[flat.argmax(dim=1)].numpy()
    in_band, off_band = flat[:, band], flat[:, ~band]
    return {
        "image AUROC": roc_auc_score(labels, scores),
        "AUROC of the map's max": roc_auc_score(labels, flat.max(dim=1).values.numpy()),
        "normal peaks in band": at_border[~labels].mean(),
        "anomalous peaks in band": at_border[labels].mean(),
        "AUROC, max in band": roc_auc_score(labels, in_band.max(dim=1).values.numpy()),
        "AUROC, max off band": roc_auc_score(labels, off_band.max(dim=1).values.numpy()),
        "AUROC, max of per-position z-scores": roc_auc_score(labels, z_scores.flatten(1).max(dim=1).values.numpy()),
        "band share of pixels": band.float().mean().item(),
    }


def collect(batches: list) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Anomaly maps (images x height x width), labels and image scores of predicted batches."""
    maps = torch.cat([batch.anomaly_map.reshape(len(batch.gt_label), *batch.anomaly_map.shape[-2:]) for batch in batches])
    labels = torch.cat([batch.gt_label for batch in batches]).bool().numpy()
    return maps, labels, torch.cat([batch.pred_score for batch in batches]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", required=True, help="one data set of the config, by name")
    parser.add_argument("--models", nargs="+", required=True, help="models of the config, by name")
    parser.add_argument("--margin", type=float, default=0.1, help="width of the border band, as a share of each side")
    parser.add_argument("--output", type=Path, default=RESULTS / "score_locations.md")
    arguments = parser.parse_args()
    config = yaml.safe_load(arguments.config.read_text())
    rows = []
    for name in arguments.models:
        job = next(DadfBenchmarkJobGenerator(models=[name], data=[arguments.data]).generate_jobs(config))
        rows.append((name, peaks(job.spec, arguments.margin)))
        print(name, rows[-1][1], flush=True)
    columns = list(rows[0][1])
    lines = [
        f"# Where the anomaly maps peak: {arguments.data}, test set, seed 0",
        "",
        f"`python benchmarks/score_locations.py --config {arguments.config} --data '{arguments.data}' --models "
        + " ".join(f"'{name}'" for name in arguments.models)
        + f" --margin {arguments.margin}"
        + ("" if arguments.output == RESULTS / "score_locations.md" else f" --output {arguments.output}")
        + f"`. Band: the outer {arguments.margin:.0%} of each side of the map. Reads test"
        " data; chooses nothing.",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {name} | " + " | ".join(f"{values[column]:.3f}" for column in columns) + " |" for name, values in rows),
    ]
    arguments.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
