"""The Keras layers compute what the PyTorch module computes, on the same weights, both ways.

For every preset and both data formats, in inference and in training mode (batch statistics in the spatial
BatchNorm): PyTorch weights -> ``from_torch`` -> the Keras layer, and Keras weights -> ``to_torch`` -> a strictly
loaded ``cbam.CBAM``, give outputs within 1e-5 (float32). After a training step the running statistics agree too,
which holds only because the Keras layer updates the running variance with the unbiased batch variance, as PyTorch.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

import cbam
import cbam.keras

PRESETS = ("paper", "seed", "timm", "ultralytics")
FORMATS = ("channels_last", "channels_first")
C = 32  # the paper's r = 16 leaves 2 hidden units
ATOL = 1e-5


def _input(shape=(2, C, 6, 5), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _torch_out(module: torch.nn.Module, x: np.ndarray, training: bool) -> np.ndarray:
    module.train(training)
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def _assert_states_match(keras_layer, module: torch.nn.Module) -> None:
    ours, theirs = cbam.keras.to_torch(keras_layer), module.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        np.testing.assert_allclose(ours[key].numpy(), value.numpy(), atol=ATOL, rtol=0, err_msg=key)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("preset", PRESETS)
def test_from_torch(preset, data_format, training, layouts, randomize):
    module = randomize(cbam.CBAM(C, preset=preset))
    layer = cbam.keras.from_torch(cbam.keras.CBAM(C, preset=preset, data_format=data_format), module)
    x = _input()
    np.testing.assert_allclose(layouts.run(layer, x, training), _torch_out(module, x, training), atol=ATOL, rtol=0)
    _assert_states_match(layer, module)  # running statistics and num_batches_tracked after a training step


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("preset", PRESETS)
def test_to_torch(preset, data_format, training, layouts, randomize):
    layer = cbam.keras.CBAM(preset=preset, data_format=data_format)  # channel count taken from the input
    x = _input()
    layer.build(layouts.to_layer(x, data_format).shape)
    randomize(layer)
    module = cbam.CBAM(C, preset=preset)
    module.load_state_dict(cbam.keras.to_torch(layer), strict=True)
    np.testing.assert_allclose(_torch_out(module, x, training), layouts.run(layer, x, training), atol=ATOL, rtol=0)
    _assert_states_match(layer, module)


OPTIONS = {
    "all-pools": dict(pool_types=("avg", "max", "lp", "lse")),
    "conv-compress": dict(spatial_compress="conv"),
    "kernel-3": dict(kernel_size=3),
    "spatial-first": dict(arrangement="spatial_first"),
    "parallel": dict(arrangement="parallel"),
    "channel-only": dict(spatial=False),
    "gelu-hard-sigmoid": dict(act_layer="gelu", gate="hard_sigmoid"),
    "biases-swapped": dict(mlp_bias=False, spatial_bias=True, spatial_norm=True, bn_momentum=0.3),
    "hidden-5": dict(hidden=5, act_layer="silu"),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("data_format", FORMATS)
def test_options_both_ways(options, data_format, layouts, randomize):
    module = randomize(cbam.CBAM(C, preset="paper", **options))
    layer = cbam.keras.from_torch(cbam.keras.CBAM(C, data_format=data_format, **options), module)
    x = _input(seed=2)
    for training in (False, True):
        np.testing.assert_allclose(layouts.run(layer, x, training), _torch_out(module, x, training), atol=ATOL,
                                   rtol=0)
    _assert_states_match(layer, module)
    back = cbam.CBAM(C, **options)
    back.load_state_dict(cbam.keras.to_torch(layer), strict=True)
    np.testing.assert_allclose(_torch_out(back, x, False), _torch_out(module, x, False), atol=ATOL, rtol=0)


@pytest.mark.parametrize("data_format", FORMATS)
def test_gates_alone(data_format, layouts, randomize):
    """The gate layers convert alone, with the PyTorch gates' own keys (no ``channel.`` / ``spatial.`` prefix)."""
    x = _input(seed=3)
    pairs = [(cbam.ChannelGate(C, 4), cbam.keras.ChannelGate(C, 4, data_format=data_format)),
             (cbam.SpatialGate(C, 5, bias=True), cbam.keras.SpatialGate(C, 5, bias=True, data_format=data_format))]
    for module, layer in pairs:
        randomize(module)
        cbam.keras.from_torch(layer, module)
        for training in (False, True):
            np.testing.assert_allclose(layouts.run(layer, x, training), _torch_out(module, x, training), atol=ATOL,
                                       rtol=0)
        assert list(cbam.keras.to_torch(layer)) == list(module.state_dict())


def test_single_value_batch_uses_running_statistics(layouts, randomize):
    """Batch 1 at 1 x 1 has no batch statistics: both use the running ones in training mode, and update nothing."""
    module = randomize(cbam.CBAM(C))
    layer = cbam.keras.from_torch(cbam.keras.CBAM(C), module)
    x = _input(shape=(1, C, 1, 1))
    np.testing.assert_allclose(layouts.run(layer, x, True), _torch_out(module, x, True), atol=ATOL, rtol=0)
    _assert_states_match(layer, module)
    assert int(cbam.keras.to_torch(layer)["spatial.norm.num_batches_tracked"]) == 3


def test_ultralytics_has_one_channel_layer():
    layer = cbam.keras.CBAM(8, preset="ultralytics")
    layer.build((None, 4, 4, 8))
    state = cbam.keras.to_torch(layer)
    assert set(state) == {"channel.fc1.weight", "channel.fc1.bias", "spatial.conv.weight"}
    assert tuple(state["channel.fc1.weight"].shape) == (8, 8)


def test_layouts_of_the_contract(layouts):
    """Dense kernels are PyTorch's weights transposed; conv kernels HWIO = OIHW with axes (2, 3, 1, 0)."""
    module = cbam.CBAM(C, preset="seed")
    layer = cbam.keras.from_torch(cbam.keras.CBAM(C, preset="seed"), module)
    np.testing.assert_array_equal(layouts.numpy(layer.channel.fc1_kernel), module.channel.fc1.weight.detach().T)
    conv = module.spatial.conv.weight.detach().numpy()  # [1, 2, 7, 7]: input 0 = channel average
    np.testing.assert_array_equal(layouts.numpy(layer.spatial.conv_kernel)[:, :, 0, 0], conv[0, 0])
    np.testing.assert_array_equal(layouts.numpy(layer.spatial.conv_kernel)[:, :, 1, 0], conv[0, 1])


def test_unbuilt_layer_is_built_from_the_weights(randomize):
    module = randomize(cbam.CBAM(C, preset="timm"))
    layer = cbam.keras.from_torch(cbam.keras.CBAM(preset="timm", data_format="channels_first"), module)
    assert layer.built and layer.channels == C and layer.channel.hidden_units == 2


# PyTorch parameter -> (Keras weight of the CBAM layer, the weight's layout as PyTorch's)
_GRADIENT_PAIRS = {
    "channel.fc1.weight": (("channel", "fc1_kernel"), lambda a: a.T),
    "channel.fc1.bias": (("channel", "fc1_bias"), lambda a: a),
    "channel.fc2.weight": (("channel", "fc2_kernel"), lambda a: a.T),
    "channel.fc2.bias": (("channel", "fc2_bias"), lambda a: a),
    "spatial.conv.weight": (("spatial", "conv_kernel"), lambda a: a.transpose(3, 2, 0, 1)),
    "spatial.norm.weight": (("spatial", "gamma"), lambda a: a),
    "spatial.norm.bias": (("spatial", "beta"), lambda a: a),
}


@pytest.mark.skipif(keras.backend.backend() != "torch",
                    reason="gradients taken with torch.autograd, which sees Keras tensors on the PyTorch backend only")
@pytest.mark.parametrize("pool", ["avg", "max", "lp", "lse"])
def test_gradients_match_the_torch_module(pool, randomize):
    """Input and weight gradients agree for every pool type, with an all-zero channel: its L2 norm has gradient 0
    (torch.linalg.vector_norm's), not sqrt's NaN at 0."""
    module = randomize(cbam.CBAM(C, pool_types=(pool,)))
    layer = cbam.keras.from_torch(cbam.keras.CBAM(C, pool_types=(pool,), data_format="channels_first"), module)
    x = _input(seed=4)
    x[:, 3] = 0.0
    weights = torch.from_numpy(np.random.default_rng(5).normal(size=x.shape).astype(np.float32))
    module.train()
    ours, theirs = torch.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    (module(theirs) * weights).sum().backward()
    (layer(ours, training=True) * weights).sum().backward()
    assert torch.isfinite(ours.grad).all()
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), atol=ATOL, rtol=1e-5)
    for key, parameter in module.named_parameters():
        (gate, attr), layout = _GRADIENT_PAIRS[key]
        grad = getattr(getattr(layer, gate), attr).value.grad
        assert grad is not None, key
        np.testing.assert_allclose(layout(grad.numpy()), parameter.grad.numpy(), atol=1e-4, rtol=1e-4, err_msg=key)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="graphs with an unknown batch are TensorFlow's")
def test_unknown_batch_in_a_tensorflow_graph(randomize):
    """With shapes unknown when traced, the norm picks batch or running statistics per call (``ops.where``)."""
    import tensorflow as tf

    module = randomize(cbam.CBAM(C))
    layer = cbam.keras.from_torch(cbam.keras.CBAM(C), module)
    step = tf.function(lambda t: layer(t, training=True), input_signature=[tf.TensorSpec([None, None, None, C])])
    for shape in ((3, C, 5, 6), (1, C, 1, 1)):  # batch statistics, then a single value: running ones, no update
        x = _input(shape)
        y = step(x.transpose(0, 2, 3, 1)).numpy().transpose(0, 3, 1, 2)
        np.testing.assert_allclose(y, _torch_out(module, x, True), atol=ATOL, rtol=0)
    _assert_states_match(layer, module)
