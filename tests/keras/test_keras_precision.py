"""The Keras layers in other dtypes: mixed precision, float64 and bfloat16 layers, bfloat16 weights both ways.

Under ``mixed_float16`` / ``mixed_bfloat16`` the spatial BatchNorm keeps float32 statistics that training updates
(never autocast, as Keras' own BatchNormalization's), and the statistics and the ``lp`` / ``lse`` pools are computed in
float32, so more than 65504 values (float16's largest) do not overflow. ``dtype=`` on ``CBAM`` reaches its gates.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import cbam
import cbam.keras

C = 32
POOLS = ("avg", "max", "lp", "lse")
COMPUTE = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
TOLERANCE = {"float16": 2e-2, "bfloat16": 1e-1}  # against float32, on outputs and statistics of order 1


@pytest.fixture
def global_policy():
    """Set Keras' global dtype policy for one test; the one before is restored afterwards, even on failure."""
    before = keras.config.dtype_policy()
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy(before)


def _dtype(value) -> str:
    return keras.backend.standardize_dtype(value.dtype)


def _input(shape=(2, 6, 5, C), seed=1) -> np.ndarray:  # NHWC
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _statistics(layer, layouts) -> np.ndarray:
    spatial = layer.spatial if isinstance(layer, cbam.keras.CBAM) else layer
    return np.concatenate([layouts.numpy(spatial.moving_mean), layouts.numpy(spatial.moving_variance)])


@pytest.mark.parametrize("policy", COMPUTE, ids=COMPUTE.values())
def test_mixed_precision_trains_the_running_statistics(policy, global_policy, layouts, randomize):
    module = randomize(cbam.CBAM(C, pool_types=POOLS))
    reference = cbam.keras.from_torch(cbam.keras.CBAM(C, pool_types=POOLS), module)  # float32
    global_policy(policy)
    layer = cbam.keras.from_torch(cbam.keras.CBAM(C, pool_types=POOLS), module)
    compute = COMPUTE[policy]
    assert layer.compute_dtype == layer.channel.compute_dtype == layer.spatial.compute_dtype == compute
    assert {_dtype(w) for w in layer.weights} == {"float32", "int32"}  # variables stay float32
    loaded = _statistics(layer, layouts).copy()
    x = _input()
    for _ in range(2):
        y, expected = layer(x, training=True), reference(x, training=True)
        assert _dtype(y) == compute
        np.testing.assert_allclose(layouts.numpy(y).astype(np.float32), layouts.numpy(expected),
                                   atol=TOLERANCE[compute], rtol=TOLERANCE[compute])
    statistics = _statistics(layer, layouts)
    assert not np.allclose(statistics, loaded)  # updated in place, not in an autocast copy
    np.testing.assert_allclose(statistics, _statistics(reference, layouts), rtol=TOLERANCE[compute])
    assert int(layouts.numpy(layer.spatial.num_batches_tracked)) == 5  # randomize's 3, then two steps
    inference = layer(x)
    assert _dtype(inference) == compute
    np.testing.assert_allclose(layouts.numpy(inference).astype(np.float32), layouts.numpy(reference(x)),
                               atol=TOLERANCE[compute], rtol=TOLERANCE[compute])


def test_float16_statistics_and_pools_of_more_than_65504_values(global_policy, layouts, randomize):
    """One 256 x 257 map, 65792 values, more than float16's largest: the batch variance times that count, and the lp
    pool's sum of squares, overflow float16; computed in float32, they stay finite and match the float32 layers."""
    x = 3 * _input((1, 256, 257, 4), seed=2)
    spatial_module = randomize(cbam.SpatialGate(4, 3, bn_momentum=1.0))  # running statistics = the batch's
    spatial_reference = cbam.keras.from_torch(cbam.keras.SpatialGate(4, 3, bn_momentum=1.0), spatial_module)
    options = dict(hidden=2, pool_types=("lp", "lse"))
    channel_module = randomize(cbam.ChannelGate(4, **options))
    channel_reference = cbam.keras.from_torch(cbam.keras.ChannelGate(4, **options), channel_module)
    global_policy("mixed_float16")
    spatial = cbam.keras.from_torch(cbam.keras.SpatialGate(4, 3, bn_momentum=1.0), spatial_module)
    channel = cbam.keras.from_torch(cbam.keras.ChannelGate(4, **options), channel_module)
    for layer, reference in ((spatial, spatial_reference), (channel, channel_reference)):
        y = layer(x, training=True)
        assert _dtype(y) == "float16"
        np.testing.assert_allclose(layouts.numpy(y).astype(np.float32), layouts.numpy(reference(x, training=True)),
                                   atol=5e-2, rtol=2e-2)
    statistics = _statistics(spatial, layouts)
    assert np.isfinite(statistics).all() and statistics[1] > 1.0  # a batch variance over 1: var * count > 65504
    np.testing.assert_allclose(statistics, _statistics(spatial_reference, layouts), rtol=1e-3)
    pooled = layouts.numpy(cbam.keras.layers._pool(keras.ops.cast(x, "float16"), "lp", (1, 2)))
    assert np.isfinite(pooled).all() and (pooled > 256).all()  # square roots of sums over 65504


def _jax_without_x64() -> bool:
    if keras.backend.backend() != "jax":
        return False
    import jax

    return not jax.config.jax_enable_x64


@pytest.mark.skipif(_jax_without_x64(), reason="JAX holds float64 as float32 unless jax_enable_x64 is set")
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_float64_matches_the_torch_module_in_float64(data_format, layouts, randomize):
    module = randomize(cbam.CBAM(C, pool_types=POOLS, spatial_compress="conv")).double()
    layer = cbam.keras.from_torch(
        cbam.keras.CBAM(C, pool_types=POOLS, spatial_compress="conv", data_format=data_format, dtype="float64"), module
    )
    assert layer.channel.compute_dtype == layer.spatial.compute_dtype == "float64"
    x = np.random.default_rng(3).normal(size=(2, C, 6, 5))
    for training in (False, True):
        module.train(training)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        y = layouts.run(layer, x, training)
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, expected, atol=1e-12, rtol=0)
    state = cbam.keras.to_torch(layer)
    for key, value in module.state_dict().items():
        assert state[key].dtype == value.dtype, key
        np.testing.assert_allclose(state[key].numpy(), value.numpy(), atol=1e-12, rtol=0, err_msg=key)


def test_bfloat16_layer_runs_in_bfloat16(layouts, randomize):
    module = randomize(cbam.CBAM(C))
    reference = cbam.keras.from_torch(cbam.keras.CBAM(C), module)
    layer = cbam.keras.from_torch(cbam.keras.CBAM(C, dtype="bfloat16"), module)
    for gate in (layer.channel, layer.spatial):
        assert gate.compute_dtype == "bfloat16"
        assert {_dtype(w) for w in gate.weights} <= {"bfloat16", "int32"}
    x = _input()
    for training in (False, True):
        y = layer(x, training=training)
        assert _dtype(y) == "bfloat16"
        np.testing.assert_allclose(layouts.numpy(keras.ops.cast(y, "float32")),
                                   layouts.numpy(reference(x, training=training)), atol=0.1, rtol=0.1)


def test_bfloat16_weights_both_ways(randomize):
    """A bfloat16 module loads into a float32 layer and a bfloat16 one; a bfloat16 layer's state dict is bfloat16."""
    module = randomize(cbam.CBAM(C, spatial_compress="conv")).to(torch.bfloat16)
    expected = module.state_dict()
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        layer = cbam.keras.from_torch(cbam.keras.CBAM(C, spatial_compress="conv", dtype=dtype), module)
        state = cbam.keras.to_torch(layer)
        assert list(state) == list(expected)
        for key, value in expected.items():
            want = torch.long if key.endswith("num_batches_tracked") else torch_dtype
            assert state[key].dtype == want and state[key].shape == value.shape, key
            torch.testing.assert_close(state[key].to(value.dtype), value, atol=0, rtol=0)  # bfloat16 is exact in both
    back = cbam.CBAM(C, spatial_compress="conv").to(torch.bfloat16)
    back.load_state_dict(state, strict=True)
