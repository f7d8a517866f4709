"""``preset="seed"`` is the TensorFlow 1 function this project started from, checked against a NumPy re-expression.

The NumPy version below is written from the seed's semantics, not from the layer: average and max pooling over H x W,
one shared pair of dense layers with biases (hidden width C/2, ReLU between) applied to each descriptor, the two
results summed, sigmoid, multiply; then the channel-wise mean and max maps stacked, a 7 x 7 convolution with bias and
'same' padding, sigmoid, multiply. NHWC, as the seed.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import cbam.keras


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def seed_attention(x, fc1_w, fc1_b, fc2_w, fc2_b, conv_w, conv_b):
    """The seed function in NumPy, float64. ``x`` NHWC; dense weights [in, out]; ``conv_w`` [k, k, 2, 1]."""
    x = x.astype(np.float64)
    n, h, w, _ = x.shape
    descriptors = np.stack([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=1)  # (N, 2, C)
    hidden = np.maximum(descriptors @ fc1_w + fc1_b, 0.0)
    channel = _sigmoid((hidden @ fc2_w + fc2_b).sum(axis=1))  # (N, C)
    refined = x * channel[:, None, None, :]
    maps = np.stack([refined.mean(axis=3), refined.max(axis=3)], axis=3)  # (N, H, W, 2)
    k = conv_w.shape[0]
    pad = k // 2
    padded = np.pad(maps, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    logits = np.full((n, h, w), float(conv_b[0]))
    for dy in range(k):
        for dx in range(k):  # a correlation, as every deep-learning "convolution"
            logits += padded[:, dy:dy + h, dx:dx + w, :] @ conv_w[dy, dx, :, 0]
    return refined * _sigmoid(logits)[..., None]


def _weights(layer, layouts):
    ch, sp = layer.channel, layer.spatial
    return [layouts.numpy(v) for v in (ch.fc1_kernel, ch.fc1_bias, ch.fc2_kernel, ch.fc2_bias, sp.conv_kernel,
                                       sp.conv_bias)]


@pytest.mark.parametrize("channels", [32, 7])
def test_seed_preset_is_the_seed_function(channels, layouts, randomize):
    inputs = keras.Input((9, 8, channels))
    model = keras.Model(inputs, cbam.keras.cbam_block(inputs, preset="seed", name="cbam_1"))
    layer = model.get_layer("cbam_1")
    randomize(layer)  # non-zero biases, so that they count
    x = np.random.default_rng(0).normal(size=(2, 9, 8, channels)).astype(np.float32)
    expected = seed_attention(x, *_weights(layer, layouts))
    np.testing.assert_allclose(layouts.numpy(model(x)), expected, atol=1e-5, rtol=0)
    # channels_first computes the same function with the same weights
    first = cbam.keras.from_torch(cbam.keras.CBAM(channels, preset="seed", data_format="channels_first"),
                                  cbam.keras.to_torch(layer))
    np.testing.assert_allclose(layouts.run(first, x.transpose(0, 3, 1, 2)), expected.transpose(0, 3, 1, 2),
                               atol=1e-5, rtol=0)


def test_seed_preset_structure_and_glorot_init(layouts):
    layer = cbam.keras.CBAM(32, preset="seed")
    layer.build((None, 8, 8, 32))
    assert layer.channel.hidden_units == 16  # inner_units_ratio = 0.5
    fc1_w, fc1_b, fc2_w, fc2_b, conv_w, conv_b = _weights(layer, layouts)
    assert fc1_w.shape == (32, 16) and fc2_w.shape == (16, 32) and conv_w.shape == (7, 7, 2, 1)
    assert layer.spatial.norm is False and not any("moving" in v.path for v in layer.weights)
    for bias in (fc1_b, fc2_b, conv_b):
        np.testing.assert_array_equal(bias, 0.0)
    for kernel, fan_in, fan_out in ((fc1_w, 32, 16), (fc2_w, 16, 32), (conv_w, 98, 49)):
        limit = np.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform, TensorFlow's default
        assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.5 * limit
