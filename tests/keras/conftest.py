"""The Keras layers' tests: on the PyTorch backend unless KERAS_BACKEND names another (``make test-keras-backends``).

Keras reads KERAS_BACKEND once, when first imported, so it is set here, before any test module imports it. Keras is
in the dev extras: these tests run, they do not skip. Helpers are fixtures, since test modules cannot import each
other (tests/ has no packages).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# cbam before Keras: on the TensorFlow backend, triton (which cbam loads through torchvision) crashes the process
# when it is loaded after TensorFlow 2.21 (docs/keras.md, "Backends")
from cbam.layers import reference_only

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    """Keras 3.15 on the PyTorch backend converts tensors with ``np.array(tensor)``, which NumPy 2 warns about on
    every fit, evaluate and get_weights (Keras' code, not ours): silenced for these tests only."""
    quiet = pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    )
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(quiet)


@pytest.fixture(autouse=True)
def _seeded_reference():
    """Same draws every run; the PyTorch module on its reference path (no fused-kernel build in these tests)."""
    keras.utils.set_random_seed(0)
    torch.manual_seed(0)
    with reference_only():
        yield


class Layouts:
    """NCHW <-> the layer's layout, and a Keras call as a NumPy array in NCHW."""

    @staticmethod
    def to_layer(x: np.ndarray, data_format: str) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if data_format == "channels_last" else x

    @staticmethod
    def from_layer(y: np.ndarray, data_format: str) -> np.ndarray:
        return y.transpose(0, 3, 1, 2) if data_format == "channels_last" else y

    @staticmethod
    def numpy(value) -> np.ndarray:
        """A backend tensor or Keras variable as NumPy (a torch tensor directly: Keras' conversion warns, NumPy 2);
        a torch bfloat16 one as float32, which NumPy lacks."""
        value = getattr(value, "value", value)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        return keras.ops.convert_to_numpy(value)

    def run(self, layer: keras.layers.Layer, x_nchw: np.ndarray, training: bool = False) -> np.ndarray:
        y = layer(self.to_layer(x_nchw, layer.data_format), training=training)
        return self.from_layer(self.numpy(y), layer.data_format)


@pytest.fixture
def layouts() -> Layouts:
    return Layouts()


@pytest.fixture
def randomize():
    """Give every weight of a PyTorch CBAM (or a Keras layer) random values, BatchNorm statistics included, so a
    parity check exercises every tensor (the paper's init zeroes the norm's weight and would hide the spatial conv)."""

    def apply(target, seed: int = 0):
        rng = np.random.default_rng(seed)
        if isinstance(target, torch.nn.Module):
            with torch.no_grad():
                for name, tensor in target.state_dict().items():
                    if name.endswith("num_batches_tracked"):
                        tensor.fill_(3)
                    elif name.endswith("running_var"):
                        tensor.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, tuple(tensor.shape))))
                    else:
                        tensor.copy_(torch.from_numpy(rng.normal(0.0, 0.3, tuple(tensor.shape))))
            return target
        for variable in target.weights:
            shape = tuple(variable.shape)
            if variable.path.endswith("num_batches_tracked"):
                value = np.full(shape, 3)
            elif variable.path.endswith("moving_variance"):
                value = rng.uniform(0.5, 2.0, shape)
            else:
                value = rng.normal(0.0, 0.3, shape)
            variable.assign(value.astype(variable.dtype))
        return target

    return apply

