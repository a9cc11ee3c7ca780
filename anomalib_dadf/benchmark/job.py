"""Benchmark jobs on anomalib's pipeline interfaces, for any importable anomalib model and data module.

``anomalib benchmark`` resolves models through ``anomalib.models.get_model``, which refuses class
paths outside ``anomalib.models``. These jobs import any ``class_path`` instead, give every model of a
run the same input size, pre-processing, post-processing (:class:`~anomalib_dadf.post_processing.RankKeepingPostProcessor`:
threshold-free metrics read each model's own order of scores) and evaluator, and run each fit-and-test in a fresh process so
that its peak resident memory is its own.
"""

import importlib
import logging
import multiprocessing
import os
import resource
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Generator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pandas as pd
import torch
from anomalib.data import AnomalibDataModule, MVTecLOCO
from anomalib.engine import Engine
from anomalib.metrics import AUPRO, AUROC, F1Score
from anomalib.models.components import AnomalibModule
from anomalib.pipelines.components.base import Job, JobGenerator
from anomalib.pipelines.types import PREV_STAGE_RESULT
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Trainer, seed_everything
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_dadf.components import input_statistics
from anomalib_dadf.metrics import HELD_OUT_FLOW_NLL, SPRO, FieldAwareEvaluator, PerFlowStop
from anomalib_dadf.post_processing import RankKeepingPostProcessor

logger = logging.getLogger(__name__)

METRICS = ["image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_AUPRO", "pixel_SPRO"]


def import_class(class_path: str) -> type:
    """The class named by a dotted path, for example ``anomalib_dadf.Dadf`` or ``anomalib.models.Patchcore``.

    Raises:
        ValueError: The path names no importable class.
    """
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        msg = f"Cannot import '{class_path}': give a full dotted class path, such as 'anomalib.models.Patchcore'."
        raise ValueError(msg) from error


def shared_evaluator(datamodule: AnomalibDataModule) -> FieldAwareEvaluator:
    """The same metrics for every model; pixel metrics only where masks exist, sPRO on MVTec LOCO."""
    metrics = [
        AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
        F1Score(fields=["pred_label", "gt_label"], prefix="image_"),
        AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
    ]
    if isinstance(datamodule, MVTecLOCO):
        metrics.append(SPRO())
    return FieldAwareEvaluator(test_metrics=metrics)


def build(spec: dict[str, Any]) -> tuple[AnomalibDataModule, AnomalibModule, dict[str, Any]]:
    """The data module, the model (with the run's shared pre-processing and evaluator) and trainer arguments of a spec.

    Raises:
        TypeError: The model's class is not an anomalib model.
    """
    datamodule_class = import_class(spec["data"]["class_path"])
    datamodule: AnomalibDataModule = datamodule_class(**spec["data"].get("init_args", {}))
    model_class = import_class(spec["model"]["class_path"])
    if not issubclass(model_class, AnomalibModule):
        msg = f"{spec['model']['class_path']} is not an anomalib model (AnomalibModule)."
        raise TypeError(msg)
    # Every model on the same prior gets that prior's own input statistics (ImageNet's for a model without a backbone).
    mean, std = input_statistics(spec["model"].get("init_args", {}).get("backbone", "resnet18"))
    pre_processor = PreProcessor(transform=Compose([Resize(spec["input_size"], antialias=True), Normalize(mean, std)]))
    model = model_class(
        **spec["model"].get("init_args", {}),
        pre_processor=pre_processor,
        # The same post-processor for every model, whose normalisation keeps each model's order of scores: the
        # evaluator reads normalised scores, and anomalib's clamp ties all that leave the validation range.
        post_processor=RankKeepingPostProcessor(),
        evaluator=shared_evaluator(datamodule),
        visualizer=False,
    )
    trainer_arguments = {"max_epochs": spec["model"]["max_epochs"]} if "max_epochs" in spec["model"] else {}
    return datamodule, model, trainer_arguments


def epochs_per_flow(trainer: Trainer) -> dict[str, str]:
    """With a stop per flow, the epochs each flow trained (finest first, space-separated); else nothing."""
    stop = next((callback for callback in trainer.callbacks if isinstance(callback, PerFlowStop)), None)
    if stop is None:
        return {}
    flows = len(trainer.lightning_module.flow_scales())
    epochs = [stop.stopped[flow] + 1 if flow in stop.stopped else trainer.current_epoch for flow in range(flows)]
    return {"epochs_per_flow": " ".join(map(str, epochs))}


def exit_with_parent() -> None:
    """Stop this pool worker as soon as the process that started it ends.

    A ``kill`` of the harness would otherwise leave its current fit running on the cores, unseen, slowing
    whatever runs next (a ``Ctrl-C`` reaches both, a ``kill`` only the harness).
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def exit_once_parent_ends() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=exit_once_parent_ends, daemon=True).start()


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Fit and test one model on one data set (with ``fit_only``, only fit it); meant to run in a fresh process.

    A flow model's last logged likelihood of held-out normal images (``held_out_flow_nll``) is kept in the row, and
    with a stop per flow the epochs each flow trained (``epochs_per_flow``).
    """
    seed_everything(spec["seed"])
    datamodule, model, trainer_arguments = build(spec)
    with tempfile.TemporaryDirectory() as scratch:
        engine = Engine(
            accelerator=spec["accelerator"], devices=1, default_root_dir=scratch, logger=False, **trainer_arguments,
        )
        start = time.perf_counter()
        engine.fit(model=model, datamodule=datamodule)
        fitted = time.perf_counter()
        held_out = engine.trainer.callback_metrics.get(HELD_OUT_FLOW_NLL)
        # What the optimizers train; a frozen backbone and a memory bank are not counted.
        trained = {
            id(parameter): parameter.numel()
            for optimizer in engine.trainer.optimizers
            for group in optimizer.param_groups
            for parameter in group["params"]
            if parameter.requires_grad
        }
        row = {
            "fit_s": fitted - start,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable_params": sum(trained.values()),
            "train_images": len(datamodule.train_data),
            "epochs": engine.trainer.current_epoch,
            **({} if held_out is None else {HELD_OUT_FLOW_NLL: float(held_out)}),
            **epochs_per_flow(engine.trainer),
        }
        if spec.get("fit_only"):
            return row
        (metrics,) = engine.test(model=model, datamodule=datamodule)
        tested = time.perf_counter()

    images = next(iter(datamodule.test_dataloader())).image.to(model.device)
    model.eval()
    with torch.no_grad():
        model(images)
        durations = []
        for _ in range(5):
            begin = time.perf_counter()
            model(images)
            durations.append((time.perf_counter() - begin) * 1000 / len(images))
    return {
        **row,
        "test_s": tested - fitted,
        "ms_per_image": statistics.median(durations),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **{name: float(metrics[name]) for name in METRICS if name in metrics},
    }


class DadfBenchmarkJob(Job):
    """One model, one data set, one seed: fit, test, and measure time, memory and size.

    Args:
        spec: ``model`` and ``data`` (``name``, ``class_path``, ``init_args``; a model may add
            ``max_epochs`` and ``input_size``), ``seed``, ``input_size``, ``accelerator`` and ``fit_only``.
    """

    name = "benchmark"

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec

    def run(self, task_id: int | None = None) -> dict[str, Any]:
        """Run :func:`measure` in a fresh process; a failure becomes a row with its error, not a lost run."""
        del task_id
        row = {"data": self.spec["data"]["name"], "model": self.spec["model"]["name"], "seed": self.spec["seed"]}
        context = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(
                max_workers=1, mp_context=context, max_tasks_per_child=1, initializer=exit_with_parent,
            ) as executor:
                row |= executor.submit(measure, self.spec).result()
        except Exception as error:
            logger.exception("Benchmark job %s failed", row)
            row["error"] = "".join(traceback.format_exception_only(error)).strip()[-300:]
        logger.info("Benchmark result: %s", row)
        # Every measured number, so that the rows of a run stopped part-way can be read back from its output.
        print(f"{row['data']} | {row['model']} | seed {row['seed']}: " + ", ".join(
            f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
            for key, value in row.items() if isinstance(value, int | float) and key != "seed"
        ) + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
        return row

    @staticmethod
    def collect(results: list[dict[str, Any]]) -> pd.DataFrame:
        """One row per run."""
        return pd.DataFrame(results)

    @staticmethod
    def save(result: pd.DataFrame) -> None:
        """Nothing: :mod:`anomalib_dadf.benchmark.report` writes the files once the grid is done."""
        del result


class DadfBenchmarkJobGenerator(JobGenerator):
    """Every model x data set x seed of a benchmark config (see ``configs/benchmark.yaml``).

    A model runs ``seeds`` times (its own ``seeds`` entry, else the config's; deterministic models
    say ``seeds: 1``), at most as often as its data entry's ``seeds`` allows, at its own ``input_size``
    if it gives one (a tuning study over sizes), else the config's.

    Args:
        models: Names of the config's models to run; ``None`` runs all.
        data: Names of the config's data sets to run; ``None`` runs all.
        first_seed: Seeds below this one are not run (they ran before).

    Raises:
        ValueError: A name that is not in the config.
    """

    def __init__(self, models: list[str] | None = None, data: list[str] | None = None, first_seed: int = 0) -> None:
        self.models, self.data, self.first_seed = models, data, first_seed

    @property
    def job_class(self) -> type[DadfBenchmarkJob]:
        """The job class."""
        return DadfBenchmarkJob

    def generate_jobs(
        self,
        args: dict | None = None,
        prev_stage_result: PREV_STAGE_RESULT = None,
    ) -> Generator[DadfBenchmarkJob, None, None]:
        """Yield the jobs of a benchmark config, data set by data set."""
        del prev_stage_result
        args = args or {}
        for data in _selected(args["data"], self.data, "data"):
            for model in _selected(args["models"], self.models, "models"):
                seeds = int(model.get("seeds", args.get("seeds", 1)))
                if "seeds" in data:
                    seeds = min(seeds, int(data["seeds"]))
                for seed in range(self.first_seed, seeds):
                    yield DadfBenchmarkJob({
                        "data": data,
                        "model": model,
                        "seed": seed,
                        "input_size": list(model.get("input_size", args.get("input_size", [256, 256]))),
                        "accelerator": args.get("accelerator", "cpu"),
                        "fit_only": bool(args.get("fit_only", False)),
                    })


def _selected(entries: list[dict[str, Any]], names: list[str] | None, key: str) -> list[dict[str, Any]]:
    if names is None:
        return entries
    known = [entry["name"] for entry in entries]
    if unknown := sorted(set(names) - set(known)):
        msg = f"No {key} entry named {unknown} in the config; its {key} are {known}."
        raise ValueError(msg)
    return [entry for entry in entries if entry["name"] in names]
