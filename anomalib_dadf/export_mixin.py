"""DADF's additions to anomalib's export: refusing untrained flows, opset 18, f32-marked OpenVINO, its own INT8_PTQ.

Exports keep the antialiasing the model was trained with where they can (see :mod:`anomalib_dadf.resize`): a
Torch export runs the trained pre-processing itself, an ONNX or OpenVINO export for one input size resizes with
:class:`~anomalib_dadf.resize.FixedSizeResize`; a dynamic-size ONNX or OpenVINO export warns that it has none.

Example:
    >>> from anomalib_dadf import Dadf
    >>> Dadf.load_from_checkpoint("model.ckpt").to_openvino("exported")  # doctest: +SKIP
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from anomalib import TaskType
from anomalib.data import AnomalibDataModule
from anomalib.data.transforms.utils import extract_transforms_by_type
from anomalib.deploy import CompressionType
from anomalib.pre_processing.utils.transform import get_exportable_transform
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchvision.transforms.v2 import Compose, Normalize, Resize, Transform

from .deploy import keep_f32
from .resize import FixedSizeResize

if TYPE_CHECKING:
    import openvino as ov

logger = logging.getLogger(__name__)

# NNCF's subset_size counts batches; anomalib asks for at least 300 calibration images.
CALIBRATION_IMAGES = 300
# Which training images calibrate, and in which order, must not depend on what ran before the export.
CALIBRATION_SEED = 0


def _resize_products(model: "ov.Model") -> list[str]:
    """Names of the matrix products before the first convolution: the resize of an export for a fixed input size."""
    names = []
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Convolution":
            break
        if node.get_type_name() == "MatMul":
            names.append(node.get_friendly_name())
    return names


def _calibration_loader(datamodule: AnomalibDataModule) -> DataLoader:
    """The training images in one shuffled order, the same on every pass and whatever ran before.

    Shuffled, so that the first ``CALIBRATION_IMAGES`` of a larger training set are not those of one
    folder; fixed, so that one checkpoint always exports to the same INT8 model.
    """
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    return DataLoader(
        datamodule.train_data,
        batch_size=datamodule.train_batch_size,
        sampler=torch.randperm(len(datamodule.train_data), generator=generator).tolist(),
        num_workers=datamodule.num_workers,
        collate_fn=datamodule.external_collate_fn or datamodule.train_data.collate_fn,
    )


def _check_calibration_size(model: "ov.Model", image: torch.Tensor, mode: str) -> None:
    """Refuse calibration images of another size than the export takes, naming the fix.

    Raises:
        ValueError: The export is for one input size and the training images have another.
    """
    shape = model.inputs[0].get_partial_shape()
    if not (shape[2].is_static and shape[3].is_static):
        return
    size = (shape[2].get_length(), shape[3].get_length())
    found = tuple(image.shape[-2:])
    if found != size:
        msg = (
            f"{mode} calibrates on the training images of the data module, which are {found[0]}x{found[1]}, but this "
            f"export takes {size[0]}x{size[1]} images: export for the training images' size (input_size "
            f"[{found[0]}, {found[1]}]), or without input_size."
        )
        raise ValueError(msg)


class DadfExportMixin:
    """Export methods of :class:`~anomalib_dadf.Dadf`, layered over anomalib's ``ExportMixin``.

    Expects ``flow_steps_trained`` (a buffer counting stage-2 optimizer steps), ``reconstruction_epochs``,
    ``flow_epochs``, ``input_size``, anomalib's ``pre_processor`` and the torch ``model`` (a
    :class:`~anomalib_dadf.torch_model.DadfModel`) on the model.
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

    def _antialiased_resize(self) -> Resize | None:
        """The pre-processor's first step when it is an antialiased resize to a height and width, else ``None``."""
        transform = self.pre_processor.transform
        first = transform.transforms[0] if isinstance(transform, Compose) and transform.transforms else transform
        if isinstance(first, Resize) and first.antialias and len(first.size) == 2:
            return first
        return None

    def _onnx_transform(self, input_size: tuple[int, int] | None) -> Transform | None:
        """anomalib's exportable pre-processing, resizing with antialiasing when the input size is fixed.

        Returns ``None`` (and warns) when the export cannot keep the trained antialiasing: a dynamic input size,
        or an antialiased resize that is not the pre-processing's first step.
        """
        resize = self._antialiased_resize()
        if resize is not None and input_size is not None:
            exportable = get_exportable_transform(self.pre_processor.transform)
            fixed = FixedSizeResize(input_size, resize.size)
            rest = exportable.transforms[1:] if isinstance(exportable, Compose) else []
            if all(isinstance(step, Normalize) for step in rest):
                # The same map in the other order (each output pixel is a weighted mean, its weights sum to 1);
                # OpenVINO's CPU plugin fails to compile a per-channel Normalize fused after the matrix products.
                return Compose([*rest, fixed])
            return Compose([fixed, *rest])
        if any(resize.antialias for resize in extract_transforms_by_type(self.pre_processor.transform, Resize)):
            logger.warning(
                "This model was trained on images resized with antialiasing, but this export resizes without it (an "
                "export keeps it for a fixed input_size when the pre-processing starts with the resize): export with "
                "the size of your images (input_size), or feed the export images already resized to %s with "
                "antialiasing (anomalib_dadf.resize.read_resized); larger images fed as they are score differently "
                "(2.6-3.5 points of image AUROC on ELPV mono).",
                tuple(self.input_size),
            )
        return None

    @contextmanager
    def _exporting_with(self, transform: Transform | None) -> Iterator[None]:
        """Write the export with ``transform`` as its pre-processing (anomalib's exportable one when ``None``)."""
        saved = self.pre_processor.export_transform
        if transform is not None:
            self.pre_processor.export_transform = transform
        try:
            yield
        finally:
            self.pre_processor.export_transform = saved

    def to_torch(self, export_root: Path | str, model_file_name: str = "model") -> Path:
        """Export to Torch like any anomalib model, with the trained pre-processing, refusing untrained flows.

        A Torch export runs in eager PyTorch, which resizes with antialiasing at any input size, so it keeps
        the pre-processing the model was trained with rather than anomalib's exportable copy.
        """
        self._refuse_untrained_export()
        with self._exporting_with(self.pre_processor.transform):
            return super().to_torch(export_root, model_file_name)

    def to_onnx(
        self,
        export_root: Path | str,
        model_file_name: str = "model",
        input_size: tuple[int, int] | None = None,
        **kwargs,
    ) -> Path:
        """Export to ONNX (and through it to OpenVINO), by default at opset 18.

        With ``input_size`` (the height and width of the images the export will take), the trained
        antialiased resize is written as :class:`~anomalib_dadf.resize.FixedSizeResize`; without it the
        export resizes as anomalib's do, without antialiasing, and a warning says so.

        torch's ONNX exporter writes opset 18 natively; anomalib's default of 14 makes it run the ONNX
        version converter, which prints a traceback for a model it then exports correctly.
        """
        self._refuse_untrained_export()
        kwargs.setdefault("opset_version", 18)
        with self._exporting_with(self._onnx_transform(input_size)):
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

    def _quantization_setup(self, model: "ov.Model", datamodule: AnomalibDataModule | None, mode: str) -> dict:
        """Calibration data and scheme of DADF's INT8 quantization, as keyword arguments of NNCF's quantizers.

        Calibration: up to 300 normal training images, in a fixed shuffled order. Scheme: NNCF's for
        Transformers (LayerNorms, softmax inputs and residual sums stay in float) when the export holds
        the Transformer; a flow on the prior alone is a CNN and gets NNCF's default scheme, whose scores
        agree better with FP32's there (``benchmarks/int8_elpv.py``). The two matrix products that resize
        the images of an export for a fixed input size stay in float: quantized, they scrambled the scores.

        Raises:
            ValueError: No data module to calibrate on (the message starts as anomalib's), or training
                images of another size than a fixed-size export takes.
        """
        import nncf  # the optional `openvino` extra, as in anomalib

        if datamodule is None:
            msg = (
                f"Datamodule must be provided for OpenVINO {mode} compression: DADF calibrates on its training "
                "images (anomalib export ... --data ...)."
            )
            raise ValueError(msg)
        datamodule.setup("fit")
        _check_calibration_size(model, datamodule.train_data[0].image, mode)
        resize = _resize_products(model)
        return {
            "calibration_dataset": nncf.Dataset(_calibration_loader(datamodule), lambda batch: batch.image),
            "model_type": nncf.ModelType.TRANSFORMER if self.model.uses_reconstructions else None,
            "ignored_scope": nncf.IgnoredScope(names=resize) if resize else None,
            "subset_size": max(1, CALIBRATION_IMAGES // datamodule.train_batch_size),
        }

    def _post_training_quantization_ov(
        self,
        model: "ov.Model",
        datamodule: AnomalibDataModule | None = None,
    ) -> "ov.Model":
        """INT8 post-training quantization calibrated on training images (see :meth:`_quantization_setup`).

        anomalib's calibrates on the validation split, which may hold anomalies, with NNCF's default scheme
        for every model.
        """
        import nncf

        return nncf.quantize(model, **self._quantization_setup(model, datamodule, "INT8_PTQ"))

    def _accuracy_control_quantization_ov(
        self,
        model: "ov.Model",
        datamodule: AnomalibDataModule | None = None,
        metric: Metric | None = None,
        task: TaskType | None = None,
        max_drop: float = 0.01,
    ) -> "ov.Model":
        """INT8 quantization that keeps in float what costs more than ``max_drop`` of ``metric`` on the validation split.

        anomalib's checks the drop on the data module's *test* split, which tunes the export on the test
        images; this checks it on the validation split (DADF's data modules fill it with synthetic
        anomalies made from training images). Calibration and scheme are :meth:`_quantization_setup`'s.
        ``metric`` defaults to image F1 from the export's labels, as in anomalib.

        Raises:
            ValueError: No data module, training images of another size than a fixed-size export takes,
                or ``max_drop`` outside ``[0, 1]``.
        """
        import nncf
        from anomalib.data import ImageBatch
        from anomalib.metrics import F1Score

        del task  # the export's outputs say what it predicts
        if not 0 <= max_drop <= 1:
            msg = f"max_drop must be between 0 and 1, got {max_drop}."
            raise ValueError(msg)
        setup = self._quantization_setup(model, datamodule, "INT8_ACQ")
        metric = metric or F1Score(fields=["pred_label", "gt_label"])

        def accuracy(compiled: "ov.CompiledModel", batches: Any) -> float:
            metric.reset()
            for batch in batches:
                outputs = compiled(batch.image)
                metric.update(ImageBatch(
                    image=batch.image,
                    gt_label=batch.gt_label,
                    gt_mask=batch.gt_mask,
                    **{name: torch.from_numpy(outputs[name]) for name in ("pred_score", "pred_label", "anomaly_map", "pred_mask")},
                ))
            return float(metric.compute())

        return nncf.quantize_with_accuracy_control(
            model,
            validation_dataset=nncf.Dataset(datamodule.val_dataloader()),
            validation_fn=accuracy,
            max_drop=max_drop,
            **setup,
        )
