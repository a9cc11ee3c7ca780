"""Per epoch: the flows' likelihood of held-out normal images, and how far the norm in front of them has shrunk.

Fits models of a benchmark config on one data set (seed 0, the config's input size and pre-processing,
fit only: no test image is read) for a fixed number of epochs (a model's ``flow_patience`` is dropped,
to see the whole curve; ``.md`` summary, ``.csv`` of every epoch, ``.png`` plot) and records, after every epoch, the
``held_out_flow_nll`` the model logs (the negative log-likelihood of the validation split's normal
images, per latent dimension, with the LayerNorm's log-determinant counted) and the mean log-scale of
the LayerNorms' elementwise weights. The paper's objective leaves that log-determinant out, so its
weights can shrink without bound; this shows when that starts to cost held-out likelihood.

    HF_HUB_OFFLINE=1 python benchmarks/flow_likelihood_curves.py --config configs/tuning_flow_likelihood.yaml \\
        --data 'ELPV mono' --epochs 100 100 60 --models 'DADF, flow on prior' \\
        'DADF, flow on prior, exact objective, held-out stop' TimmFastflow   # writes results/flow_likelihood_curves.md
"""

import argparse
import copy
import shlex
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
import yaml
from anomalib.engine import Engine
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from matplotlib import pyplot as plt
from torch import nn

from anomalib_dadf import Dadf
from anomalib_dadf.benchmark.job import DadfBenchmarkJobGenerator, build, import_class
from anomalib_dadf.metrics import HELD_OUT_FLOW_NLL

RESULTS = Path(__file__).parent / "results"


class Curve(Callback):
    """After every training epoch: the logged held-out NLL and the norms' mean log-scale."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(HELD_OUT_FLOW_NLL)
        if value is None:
            return
        weights = [
            module.weight for module in pl_module.modules()
            if isinstance(module, nn.LayerNorm) and module.weight is not None and module.weight.dim() == 3
        ]
        log_scale = sum(torch.log(weight.abs()).sum() for weight in weights) / sum(weight.numel() for weight in weights)
        self.rows.append({"epoch": trainer.current_epoch + 1, "held_out_nll": float(value), "norm_log_scale": float(log_scale)})


def curve(spec: dict, epochs: int) -> pd.DataFrame:
    """Fit one model for ``epochs`` epochs (DADF: flow epochs) and return its per-epoch curve."""
    spec = copy.deepcopy(spec)
    spec["model"]["init_args"].pop("flow_patience", None)
    if not issubclass(import_class(spec["model"]["class_path"]), Dadf):
        spec["model"]["max_epochs"] = epochs
    else:
        spec["model"]["init_args"]["flow_epochs"] = epochs
    seed_everything(spec["seed"])
    datamodule, model, trainer_arguments = build(spec)
    recorder = Curve()
    with tempfile.TemporaryDirectory() as scratch:
        engine = Engine(
            accelerator=spec["accelerator"], devices=1, default_root_dir=scratch, logger=False, callbacks=[recorder],
            **trainer_arguments,
        )
        engine.fit(model=model, datamodule=datamodule)
    return pd.DataFrame(recorder.rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", required=True, help="one data set of the config, by name")
    parser.add_argument("--models", nargs="+", required=True, help="models of the config, by name")
    parser.add_argument("--epochs", nargs="+", type=int, required=True, help="epochs per model, in --models order")
    parser.add_argument("--output", type=Path, default=RESULTS / "flow_likelihood_curves.md")
    arguments = parser.parse_args()
    if len(arguments.epochs) != len(arguments.models):
        parser.error("give one --epochs value per model")
    config = yaml.safe_load(arguments.config.read_text())
    generator = DadfBenchmarkJobGenerator(models=arguments.models, data=[arguments.data])
    specs = {job.spec["model"]["name"]: job.spec for job in generator.generate_jobs({**config, "seeds": 1})}
    curves = {name: curve(specs[name], epochs) for name, epochs in zip(arguments.models, arguments.epochs, strict=True)}
    figure, (nll_axis, scale_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    command = f"HF_HUB_OFFLINE=1 python benchmarks/flow_likelihood_curves.py {shlex.join(sys.argv[1:])}"
    lines = [f"# Held-out likelihood per epoch, {arguments.data}\n", "```bash", command, "```\n"]
    for name, frame in curves.items():
        best = frame.loc[frame["held_out_nll"].idxmin()]
        lines.append(
            f"- **{name}**: best held-out NLL {best['held_out_nll']:.3f} at epoch {int(best['epoch'])}, "
            f"{frame['held_out_nll'].iloc[-1]:.3f} at epoch {int(frame['epoch'].iloc[-1])}; the norms' mean "
            f"log-scale {frame['norm_log_scale'].iloc[-1]:.2f} then.",
        )
        nll_axis.plot(frame["epoch"], frame["held_out_nll"], label=name)
        scale_axis.plot(frame["epoch"], frame["norm_log_scale"], label=name)
    nll_axis.set_xlabel("epoch")
    nll_axis.set_ylabel("held-out NLL, nats per dimension")
    scale_axis.set_xlabel("epoch")
    scale_axis.set_ylabel("LayerNorm mean log|weight|")
    nll_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(arguments.output.with_suffix(".png"), dpi=120)
    table = pd.concat({name: frame.set_index("epoch") for name, frame in curves.items()}, axis=1).round(4)
    table.to_csv(arguments.output.with_suffix(".csv"))
    lines += ["", f"![curves]({arguments.output.with_suffix('.png').name})", "",
              f"Every epoch's values: [{arguments.output.with_suffix('.csv').name}]({arguments.output.with_suffix('.csv').name})."]
    arguments.output.write_text("\n".join(lines) + "\n")
    print(f"Wrote {arguments.output}")


if __name__ == "__main__":
    main()
