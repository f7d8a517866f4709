"""CBAM for Keras 3 (TensorFlow, JAX or PyTorch backend), interchangeable with the PyTorch module's weights.

An optional extra (``pip install 'cbam[keras]'``): ``import cbam`` never imports Keras, and importing this package
without Keras 3 raises an ImportError that says so. ``CBAM``, ``ChannelGate`` and ``SpatialGate`` take the PyTorch
module's options and presets; ``cbam_block`` is the seed's functional shape of use; ``from_torch`` / ``to_torch``
move weights in the module's state-dict contract (docs/keras.md).
"""

from ._require import keras  # first: the one-line ImportError when Keras 3 is missing
from .convert import from_torch, to_torch
from .layers import CBAM, ChannelGate, SpatialGate, cbam_block

__all__ = ["CBAM", "ChannelGate", "SpatialGate", "cbam_block", "from_torch", "keras", "to_torch"]
