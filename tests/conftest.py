"""Shared fixtures: tiny models and generated data, all offline."""

import os
import socket
from pathlib import Path

import pytest

# Tests never reach a model hub; fail fast instead of waiting on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_dadf.data.synthetic import make_mvtec

TINY_MODEL = {
    "backbone": "resnet18",
    "pre_trained": False,
    "embed_dim": 16,
    "depth": 1,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "flow_steps": 2,
}


def small_pre_processor(size: int = 64) -> PreProcessor:
    """anomalib's default pre-processing at a small input size."""
    return PreProcessor(
        transform=Compose([
            Resize((size, size), antialias=True),
            Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
        ]),
    )


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated MVTec AD-style data set with one category, ``widget``."""
    return make_mvtec(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache with the hub switched off (huggingface_hub reads the env at import).

    Any network connection fails the test, so weights can only come from this cache or a local file.
    """

    def no_network(*args: object, **kwargs: object) -> None:
        msg = "a test tried to reach the network"
        raise AssertionError(msg)

    monkeypatch.setattr(socket.socket, "connect", no_network)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    return cache
