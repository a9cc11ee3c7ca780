"""DADF's additions to anomalib's export: refusing untrained flows, opset 18, f32-marked OpenVINO, its own INT8_PTQ.

Every export also warns when it drops the antialiasing the model was trained with (see :mod:`anomalib_dadf.resize`).

Example:
    >>> from anomalib_dadf import Dadf
    >>> Dadf.load_from_checkpoint("model.ckpt").to_openvino("exported")  # doctest: +SKIP
"""

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib import TaskType
from anomalib.data import AnomalibDataModule
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.deploy import CompressionType
from torchmetrics import Metric
from torchvision.transforms.v2 import Resize

from .deploy import keep_f32

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)

# NNCF's subset_size counts batches; anomalib asks for at least 300 calibration images.
CALIBRATION_IMAGES = 300


class DadfExportMixin:
    """Export methods of :class:`~anomalib_dadf.Dadf`, layered over anomalib's ``ExportMixin``.

    Expects ``flow_steps_trained`` (a buffer counting stage-2 optimizer steps), ``reconstruction_epochs``,
    ``flow_epochs``, ``input_size`` and anomalib's ``pre_processor`` on the model.
    """

    flow_steps_trained: torch.Tensor
    reconstruction_epochs: int
    flow_epochs: int

    def _refuse_untrained_export(self) -> None:
        if int(self.flow_steps_trained) == 0:
            msg = (
                "This DADF model's flows were never trained (a checkpoint from stage 1, reconstruction, or an "
                "untrained model), so its scores mean nothing. Export a checkpoint saved after at least one flow "
                f"epoch: train for all reconstruction_epochs + flow_epochs ({self.reconstruction_epochs} + "
                f"{self.flow_epochs})."
            )
            raise RuntimeError(msg)

    def _warn_if_the_export_drops_antialiasing(self) -> None:
        if any(resize.antialias for resize in extract_transforms_by_type(self.pre_processor.transform, Resize)):
            logger.warning(
                "This model was trained on images resized with antialiasing, but anomalib exports its Resize without "
                "it: feed the export images already resized to %s with antialiasing (anomalib_dadf.resize.read_resized), "
                "or larger images score differently (3.5 points of image AUROC on ELPV).",
                tuple(self.input_size),
            )

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Export to Torch like any anomalib model, refusing a model whose flows never trained."""
        self._refuse_untrained_export()
        self._warn_if_the_export_drops_antialiasing()
        return super().to_torch(export_root, model_file_name)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs,
    ) -> Path:
        """Export to ONNX (and through it to OpenVINO), by default at opset 18.

        torch's ONNX exporter writes opset 18 natively; anomalib's default of 14 makes it run the ONNX
        version converter, which prints a traceback for a model it then exports correctly.
        """
        self._refuse_untrained_export()
        self._warn_if_the_export_drops_antialiasing()
        kwargs.setdefault("opset_version", 18)
        return super().to_onnx(export_root, model_file_name, input_size, **kwargs)

    def to_openvino(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        compression_type: CompressionType | None = None,
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
        ov_kwargs: dict[str, Any] | None = None,
        onnx_kwargs: dict[str, Any] | None = None,
    ) -> Path:
        """Export to OpenVINO like any anomalib model, marked to run at f32 on every CPU by default.

        Loaded with default settings (anomalib's ``OpenVINOInferencer``, ``anomalib predict``, OpenVINO
        itself), the export then scores what this model scores, also on CPUs where OpenVINO would
        otherwise compute in bf16 (see :mod:`anomalib_dadf.deploy`; ``python -m anomalib_dadf.deploy
        --allow-bf16 model.xml`` lets such a CPU run it in bf16). Exports with quantised activations
        (``INT8_PTQ``, ``INT8_ACQ``) are left as NNCF made them: NNCF chose each node's precision.
        """
        path = super().to_openvino(
            export_root, model_file_name, input_size, compression_type, datamodule, metric, task, max_drop,
            ov_kwargs, onnx_kwargs,
        )
        if compression_type in {None, CompressionType.FP16, CompressionType.INT8}:
            keep_f32(path)
        return path

    @staticmethod
    def _post_training_quantization_ov(
        model: "ov.Model",
        datamodule: AnomalibDataModule | None = None,
    ) -> "ov.Model":
        """INT8 post-training quantization with NNCF's Transformer scheme, calibrated on training images.

        anomalib's default calibrates on the validation split, which may hold anomalies, with NNCF's
        default scheme, which quantizes the attention blocks' LayerNorms, softmax inputs and residual
        sums like a CNN's. This uses up to 300 normal training images and NNCF's scheme for
        Transformers, which keeps those in float; ``benchmarks/int8_elpv.py`` compares the two.

        Raises:
            ValueError: No data module to calibrate on (the message starts as anomalib's).
        """
        import nncf  # the optional `openvino` extra, as in anomalib

        if datamodule is None:
            msg = (
                "Datamodule must be provided for OpenVINO INT8_PTQ compression: DADF calibrates on its training "
                "images (anomalib export ... --data ...)."
            )
            raise ValueError(msg)
        datamodule.setup("fit")
        calibration = nncf.Dataset(datamodule.train_dataloader(), lambda batch: batch.image)
        return nncf.quantize(
            model,
            calibration,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=max(1, CALIBRATION_IMAGES // datamodule.train_batch_size),
        )
