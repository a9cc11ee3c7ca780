"""What the exported graph's resize costs on ELPV, and the workaround: resize with antialiasing first.

anomalib exports a model's pre-processing into the graph, but with antialiasing turned off in every
``Resize`` (``anomalib.pre_processing.utils.transform.get_exportable_transform``: the ONNX route does not
carry it). A model trained and tested on antialiased downscaling then sees aliased cells once deployed.
This scores ELPV's test cells four ways with one checkpoint: anomalib's test (antialiased, as trained);
the same with the export's transform (no antialiasing); the FP32 OpenVINO export through anomalib's
``OpenVINOInferencer`` on the cells as read (the graph downscales them); and the same export on cells
first resized to the model's input size with antialiasing (``anomalib_dadf.resize``), so that the graph's
resize does nothing.

    anomalib train --config configs/quickstart.yaml
    python benchmarks/export_resize.py --ckpt results/Dadf/ELPV/mono/latest/weights/lightning/model.ckpt
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from anomalib.deploy import OpenVINOInferencer
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
    with tempfile.TemporaryDirectory() as scratch:
        inferencer = OpenVINOInferencer(model.to_openvino(scratch), device="CPU")
        as_read = [float(np.squeeze(inferencer.predict(path).pred_score)) for path in paths]
        resized = [float(np.squeeze(inferencer.predict(read_resized(path, model.input_size)).pred_score)) for path in paths]
    rows["OpenVINO FP32, cells as read (the graph downscales)"] = roc_auc_score(labels, as_read)
    rows["OpenVINO FP32, cells resized with antialiasing first"] = roc_auc_score(labels, resized)

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
