"""Export a trained DADF checkpoint to OpenVINO and score a folder of images with anomalib's inferencer.

    python examples/deploy_openvino.py --ckpt results/Dadf/ELPV/mono/latest/weights/lightning/model.ckpt \\
        --images path/to/images --output deployed

Writes the OpenVINO model under ``OUTPUT/weights/openvino/`` and, for every image, a heat-map
overlay ``OUTPUT/overlays/<name>.png`` captioned with its score and label; prints one line per image.
Runs on the CPU at f32. It passes OpenVINO's f32 precision hint: on CPUs with bf16 (AVX-512-bf16, AMX)
the plugin runs some nodes of the export in bf16 despite its f32 marking (see the README), and
thresholds were set on f32 scores. Each image is resized to the model's input size with antialiasing
before it reaches the export (``anomalib_dadf.resize``): the resize of a dynamic-size export has none, and on
ELPV mono that cost 2.6-3.5 points of image AUROC in two checkpoints. An export for the size of your
images (``model.to_openvino(..., input_size=(height, width))``) keeps the antialiasing instead.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anomalib.deploy import CompressionType, OpenVINOInferencer
from anomalib.visualization.image.functional import (
    add_text_to_image,
    overlay_image,
    visualize_anomaly_map,
    visualize_image,
)

from anomalib_dadf import Dadf
from anomalib_dadf.parity import F32
from anomalib_dadf.resize import read_resized

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="DADF Lightning checkpoint")
    parser.add_argument("--images", type=Path, required=True, help="folder of images to score")
    parser.add_argument("--output", type=Path, default=Path("deployed"))
    parser.add_argument("--compression", choices=["FP16", "INT8"], default=None, help="optional weight compression")
    arguments = parser.parse_args(argv)

    images = sorted(path for path in arguments.images.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        parser.error(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {arguments.images}")

    model = Dadf.load_from_checkpoint(arguments.ckpt)
    compression = CompressionType(arguments.compression) if arguments.compression else None
    model_path = model.to_openvino(arguments.output, compression_type=compression)
    inferencer = OpenVINOInferencer(model_path, device="CPU", config=F32)

    overlays = arguments.output / "overlays"
    overlays.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        prediction = inferencer.predict(read_resized(path, model.input_size))
        score = float(np.squeeze(prediction.pred_score))
        label = "anomalous" if bool(np.squeeze(prediction.pred_label)) else "normal"
        heat_map = visualize_anomaly_map(np.squeeze(prediction.anomaly_map).astype(np.float32), colormap=True)
        overlay = overlay_image(visualize_image(str(path)).convert("RGB"), heat_map, alpha=0.5)
        overlay = add_text_to_image(overlay, f"{label} {score:.2f}")
        target = overlays / f"{path.stem}.png"
        overlay.convert("RGB").save(target)
        written.append(target)
        print(f"{path.name}: score {score:.3f} ({label})")
    print(f"OpenVINO model: {model_path}\nOverlays: {overlays}")
    return written


if __name__ == "__main__":
    main()
