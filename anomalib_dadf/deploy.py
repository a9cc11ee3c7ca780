"""OpenVINO exports that score at f32 wherever they are loaded with default settings.

OpenVINO's CPU plugin runs FP32 models in bf16 on CPUs that support it unless the caller passes
``INFERENCE_PRECISION_HINT: f32``; anomalib's ``OpenVINOInferencer`` and ``anomalib predict`` pass
nothing. DADF's scores come from flows whose log-likelihoods are sums over hundreds of channels, so
bf16 rounding of the prior and the reconstructions moves them (normalised scores by up to 0.02 in
our measurement, past thresholds that were set on f32 scores). A precision hint stored in the
model's ``rt_info`` does not change what the plugin compiles. What it does honour is OpenVINO's
per-node "precise" runtime attribute (``DisablePrecisionConversion``, the marker OpenVINO's own FP16
compression puts on sensitive nodes): the CPU plugin keeps such nodes in their original precision
under a bf16 or f16 inference precision. :func:`keep_f32` puts it on every computing node of an
exported IR (DADF's export does so); weights keep their stored precision, so FP16 and INT8 exports
stay compressed. :func:`allow_bf16` takes it off again, for a CPU that should run the model in bf16
(faster, at the score error measured in ``benchmarks/``):

    python -m anomalib_dadf.deploy --allow-bf16 weights/openvino/model.xml

Example:
    >>> from anomalib_dadf.deploy import allow_bf16, keep_f32, runs_at_f32
    >>> keep_f32("weights/openvino/model.xml")  # doctest: +SKIP
    >>> runs_at_f32("weights/openvino/model.xml")  # doctest: +SKIP
    True
"""

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

# OpenVINO's Python key for its DisableFP16Compression / DisablePrecisionConversion attribute ("precise").
PRECISE = "precise_0"
# Serialised form of that attribute in the IR's XML.
SERIALISED = "DisablePrecisionConversion"
# Nodes that hold data rather than compute it: marking them would keep weights from compression.
DATA_NODES = ("Parameter", "Result", "Constant")


def _computing_nodes(model: object) -> list:
    return [node for node in model.get_ordered_ops() if node.get_type_name() not in DATA_NODES]


def _rewrite(xml_path: str | Path, mark: bool) -> None:
    """Put the f32 marking on every computing node of an OpenVINO IR, or take it off.

    The IR (``.xml`` and ``.bin``) is written to a temporary copy first and renamed over the original.
    """
    import openvino as ov

    xml_path = Path(xml_path)
    with TemporaryDirectory(dir=xml_path.parent) as scratch:
        model = ov.Core().read_model(xml_path)
        for node in _computing_nodes(model):
            info = node.get_rt_info()
            if mark:
                info[PRECISE] = ""
            elif SERIALISED + "_0" in info:
                del info[SERIALISED + "_0"]
        marked = Path(scratch) / xml_path.name
        # Constants are saved as they were read (FP16 or INT8 ones stay compressed).
        ov.save_model(model, marked, compress_to_fp16=False)
        del model
        os.replace(marked.with_suffix(".bin"), xml_path.with_suffix(".bin"))
        os.replace(marked, xml_path)


def keep_f32(xml_path: str | Path) -> None:
    """Mark every computing node of an OpenVINO IR (``model.xml``) to run in f32 under any inference precision."""
    _rewrite(xml_path, mark=True)


def allow_bf16(xml_path: str | Path) -> None:
    """Take :func:`keep_f32`'s marking off an OpenVINO IR, so that a bf16 CPU runs it in bf16 by default."""
    _rewrite(xml_path, mark=False)


def runs_at_f32(xml_path: str | Path) -> bool:
    """Whether every computing node of an OpenVINO IR carries the f32 marking of :func:`keep_f32`."""
    import openvino as ov

    model = ov.Core().read_model(Path(xml_path))
    return all(SERIALISED + "_0" in node.get_rt_info() for node in _computing_nodes(model))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: mark an exported IR to run in f32 (the export's default), or allow bf16."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("xml", type=Path, help="an exported model.xml")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--allow-bf16", action="store_true", help="take the f32 marking off")
    action.add_argument("--keep-f32", action="store_true", help="put the f32 marking on every computing node")
    arguments = parser.parse_args(argv)
    (keep_f32 if arguments.keep_f32 else allow_bf16)(arguments.xml)
    state = "runs at f32 under any inference precision" if runs_at_f32(arguments.xml) else "follows the CPU's precision"
    print(f"{arguments.xml}: {state}.")


if __name__ == "__main__":
    main()
