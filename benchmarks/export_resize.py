"""What the exported graph's resize costs on ELPV, and the two ways DADF's exports keep the antialiasing.

anomalib exports a model's pre-processing into the graph, but with antialiasing turned off in every
``Resize`` (``anomalib.pre_processing.utils.transform.get_exportable_transform``: the ONNX route does not
carry it). A model trained and tested on antialiased downscaling then sees aliased cells once deployed.
This scores ELPV's test cells with one checkpoint: anomalib's test (antialiased, as trained); the same
with anomalib's exportable transform (no antialiasing); the FP32 OpenVINO export of dynamic input size
through anomalib's ``OpenVINOInferencer`` on the cells as read (the graph downscales them) and on cells
first resized to the model's input size with antialiasing (``anomalib_dadf.resize.read_resized``); the
FP32 OpenVINO export for the cells' own size (``input_size``: DADF writes the antialiased resize as a
fixed linear map, ``FixedSizeResize``) and the Torch export (eager PyTorch, the trained pre-processing),
both on the cells as read.

    anomalib train --config configs/quickstart.yaml
    python benchmarks/export_resize.py --ckpt results/Dadf/ELPV/mono/latest/weights/lightning/model.ckpt
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from anomalib.data.utils import read_image
from anomalib.deploy import OpenVINOInferencer, TorchInferencer
from anomalib.engine import Engine
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anomalib_dadf import Dadf
from anomalib_dadf.data import ELPV
from anomalib_dadf.resize import read_resized


def lightning_auroc(ckpt: Path, datamodule: ELPV, *, antialias: bool) -> float:
    """anomalib's test image AUROC, with the trained transform or with the export's."""
    model = Dadf.load_from_checkpoint(ckpt)
    if not antialias:
        model.pre_processor.transform = model.pre_processor.export_transform
    with tempfile.TemporaryDirectory() as scratch:
        (metrics,) = Engine(default_root_dir=scratch, logger=False).test(model=model, datamodule=datamodule)
    return metrics["image_AUROC"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--category", default="mono")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "export_resize.md")
    arguments = parser.parse_args()

    datamodule = ELPV(category=arguments.category, eval_batch_size=16, num_workers=0)
    datamodule.setup()
    test = datamodule.test_data.samples
    paths, labels = list(test["image_path"]), np.asarray(test["label_index"], dtype=int)
    rows = {
        "anomalib test, antialiased resize (as trained)": lightning_auroc(arguments.ckpt, datamodule, antialias=True),
        "anomalib test, the export's resize (no antialiasing)": lightning_auroc(arguments.ckpt, datamodule, antialias=False),
    }
    model = Dadf.load_from_checkpoint(arguments.ckpt)
    sizes = {tuple(read_image(path, as_tensor=True).shape[-2:]) for path in paths}
    if len(sizes) != 1:
        parser.error(f"the test cells come in {len(sizes)} sizes; an export for one input size needs one")
    (cell_size,) = sizes

    def scores(inferencer: OpenVINOInferencer | TorchInferencer, images: list) -> list[float]:
        return [float(np.squeeze(inferencer.predict(image).pred_score)) for image in images]

    os.environ["TRUST_REMOTE_CODE"] = "1"  # TorchInferencer unpickles the Torch export this script just wrote
    with tempfile.TemporaryDirectory() as scratch:
        dynamic = OpenVINOInferencer(model.to_openvino(Path(scratch) / "dynamic"), device="CPU")
        fixed = OpenVINOInferencer(model.to_openvino(Path(scratch) / "fixed", input_size=cell_size), device="CPU")
        eager = TorchInferencer(model.to_torch(Path(scratch) / "torch"), device="cpu")
        resized = [read_resized(path, model.input_size) for path in paths]
        rows["OpenVINO FP32, dynamic size, cells as read (the graph downscales)"] = roc_auc_score(labels, scores(dynamic, paths))
        rows["OpenVINO FP32, dynamic size, cells resized with antialiasing first"] = roc_auc_score(labels, scores(dynamic, resized))
        fixed_name = f"OpenVINO FP32, exported for {cell_size[0]} x {cell_size[1]}, cells as read"
        rows[fixed_name] = roc_auc_score(labels, scores(fixed, paths))
        rows["Torch export, cells as read"] = roc_auc_score(labels, scores(eager, paths))

    lines = [
        f"# The export's resize on ELPV {arguments.category} (`python benchmarks/export_resize.py --ckpt CKPT`)",
        "",
        f"Checkpoint: `{arguments.ckpt}` (input {model.input_size[0]} x {model.input_size[1]}). {len(paths)} test cells.",
        "",
        "| scored by | image AUROC (test) |",
        "|---|---|",
        *(f"| {name} | {auroc:.3f} |" for name, auroc in rows.items()),
    ]
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
