"""The Keras layers as Keras layers: serialisation, training, initialisation per preset, errors, the optional import."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import torch

import cbam
import cbam.keras


def _tiny_model(preset: str = "paper", data_format: str = "channels_last") -> keras.Model:
    shape = (8, 8, 3) if data_format == "channels_last" else (3, 8, 8)
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", data_format=data_format)(inputs)
    x = cbam.keras.cbam_block(x, preset="timm", data_format=data_format, name="block")
    x = cbam.keras.CBAM(16, reduction=4, preset=preset, data_format=data_format, name="attn")(x)
    x = keras.layers.GlobalAveragePooling2D(data_format=data_format)(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


# ------------------------------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("layer", [
    cbam.keras.CBAM(16, 4, preset="seed", pool_types=("avg", "lse"), kernel_size=3, data_format="channels_first"),
    cbam.keras.CBAM(preset="ultralytics", arrangement="parallel", gate="hard_sigmoid", pool_types="max"),
    cbam.keras.ChannelGate(16, hidden=3, act_layer="gelu"),
    cbam.keras.SpatialGate(16, compress="conv", bn_momentum=0.2),
], ids=["cbam-seed", "cbam-ultralytics", "channel-gate", "spatial-gate"])
def test_config_round_trip(layer, layouts, randomize):
    x = np.random.default_rng(0).normal(size=(2, 16, 5, 5)).astype(np.float32)
    layouts.run(layer, x)  # builds it
    randomize(layer)
    expected = layouts.run(layer, x)
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    clone.build(layouts.to_layer(x, layer.data_format).shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(layouts.run(clone, x), expected)
    assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer)).get_config() == config


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_keras_file_round_trip(tmp_path, data_format, layouts, randomize):
    model = _tiny_model("paper", data_format)
    for name in ("block", "attn"):
        randomize(model.get_layer(name))
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
    if data_format == "channels_first":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("attn"), cbam.keras.CBAM)
    assert loaded.get_layer("attn").get_config() == model.get_layer("attn").get_config()
    np.testing.assert_array_equal(layouts.numpy(loaded(x)), layouts.numpy(model(x)))
    np.testing.assert_array_equal(layouts.numpy(loaded(x, training=True)), layouts.numpy(model(x, training=True)))
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]


# ------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("preset", ["paper", "seed"])
def test_fit_lowers_the_loss_and_trains_every_weight(preset, layouts):
    model = _tiny_model(preset)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
    y = (x[:, :4, :4].mean(axis=(1, 2, 3)) > 0).astype(np.int32) + (x[:, 4:, 4:, 0].mean(axis=(1, 2)) > 0)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    attn = model.get_layer("attn")
    before = {w.path: layouts.numpy(w).copy() for w in attn.weights}
    loss0 = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False)
    assert model.evaluate(x, y, verbose=0) < loss0
    for w in attn.trainable_weights:  # gradients reach every weight (the paper's norm weight starts at 0)
        assert not np.array_equal(layouts.numpy(w), before[w.path]), w.path
    if preset == "paper":  # fit runs in training mode: batch statistics and running-statistic updates
        assert int(layouts.numpy(attn.spatial.num_batches_tracked)) == 8
        assert not np.array_equal(layouts.numpy(attn.spatial.moving_mean), before[attn.spatial.moving_mean.path])


# ------------------------------------------------------------------------------------------------- initialisation
def test_initialisation_follows_each_preset(layouts):
    """As ``cbam.CBAM.reset_parameters``: paper (release) zero biases and a zero norm weight, so the spatial gate
    starts at exactly 0.5; timm (PyTorch defaults) uniform biases and a unit norm weight."""
    x = np.random.default_rng(0).normal(size=(2, 32, 6, 6)).astype(np.float32)
    paper = cbam.keras.CBAM(32, preset="paper")
    paper.build((None, 6, 6, 32))
    np.testing.assert_array_equal(layouts.numpy(paper.spatial.gamma), 0.0)
    np.testing.assert_array_equal(layouts.numpy(paper.channel.fc1_bias), 0.0)
    refined = layouts.to_layer(x, "channels_last")
    np.testing.assert_array_equal(layouts.numpy(paper.spatial.logits(refined, training=True)), 0.0)
    conv = layouts.numpy(paper.spatial.conv_kernel)  # kaiming normal, fan_out = 49: std 0.2
    assert 0.12 < conv.std() < 0.28
    timm = cbam.keras.CBAM(32, preset="timm")
    timm.build((None, 6, 6, 32))
    np.testing.assert_array_equal(layouts.numpy(timm.spatial.gamma), 1.0)
    assert timm.channel.fc1_bias is None and timm.spatial.conv_bias is None
    fc1 = layouts.numpy(timm.channel.fc1_kernel)
    assert np.abs(fc1).max() <= 1 / np.sqrt(32)
    ultra = cbam.keras.CBAM(32, preset="ultralytics")
    ultra.build((None, 6, 6, 32))
    bias = layouts.numpy(ultra.channel.fc1_bias)
    assert np.abs(bias).max() <= 1 / np.sqrt(32) and np.abs(bias).max() > 0


def test_channel_count_is_taken_from_the_input(layouts):
    layer = cbam.keras.CBAM()
    out = layer(np.zeros((1, 5, 5, 48), np.float32))
    assert tuple(out.shape) == (1, 5, 5, 48) and layer.channels == 48 and layer.channel.hidden_units == 3
    assert layer.get_config()["channels"] == 48


# ------------------------------------------------------------------------------------------------- errors
def _message(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


SAME_AS_TORCH = {
    "even-kernel": dict(kernel_size=4),
    "unknown-preset": dict(preset="cbam2"),
    "unknown-pool": dict(pool_types=("avg", "median")),
    "unknown-arrangement": dict(arrangement="sideways"),
    "unknown-compress": dict(spatial_compress="attention"),
    "no-hidden-unit": dict(reduction=32),
    "parallel-without-spatial": dict(spatial=False, arrangement="parallel"),
    "ultralytics-reduction": dict(preset="ultralytics", reduction=4),
    "repeated-pool": dict(pool_types=("max", "max")),
    "unknown-gate": dict(gate="tanh"),
}


@pytest.mark.parametrize("options", SAME_AS_TORCH.values(), ids=SAME_AS_TORCH.keys())
def test_option_errors_match_the_torch_module(options):
    with pytest.raises(ValueError) as theirs:
        cbam.CBAM(16, **options)
    with pytest.raises(ValueError) as ours:
        cbam.keras.CBAM(16, **options)
    assert _message(ours) == _message(theirs)


def test_input_errors():
    layer = cbam.keras.CBAM(16)
    with pytest.raises(ValueError, match=r"^CBAM: expected 16 channels, got 8 \(input shape \(2, 4, 4, 8\)") as e:
        layer(np.zeros((2, 4, 4, 8), np.float32))  # at build
    _message(e)
    layer(np.zeros((2, 4, 4, 16), np.float32))
    with pytest.raises(ValueError, match="^CBAM: expected 16 channels, got 4 ") as e:
        layer(np.zeros((2, 16, 4, 4), np.float32))  # built, NCHW given to an NHWC layer
    with pytest.raises(ValueError, match=r"^CBAM: expected a 4-D input \(N, H, W, C\) \(channels_last\), got shape"):
        layer(np.zeros((2, 4, 16), np.float32))
    with pytest.raises(TypeError, match="^CBAM: expected a floating-point input, got dtype int32$"):
        layer(np.zeros((2, 4, 4, 16), np.int32))
    with pytest.raises(ValueError, match="^ChannelGate: reduction 32 leaves no hidden unit for 16 channels") as e:
        cbam.keras.CBAM(reduction=32)(np.zeros((1, 2, 2, 16), np.float32))  # count from the input: at build
    _message(e)
    with pytest.raises(ValueError, match="^CBAM: unknown data_format 'NHWC'; expected one of 'channels_last'"):
        cbam.keras.CBAM(16, data_format="NHWC")
    with pytest.raises(TypeError, match="^ChannelGate: act_layer must be one of 'relu', 'gelu', 'silu', got type$"):
        cbam.keras.CBAM(16, act_layer=torch.nn.ReLU)
    with pytest.raises(ValueError, match="^CBAM: channels must be a positive integer, got 0$"):
        cbam.keras.CBAM(0)


def test_conversion_errors(randomize):
    layer = cbam.keras.CBAM(32)
    module = cbam.CBAM(32)
    state = module.state_dict()
    with pytest.raises(ValueError, match=r"^to_torch: expected a built layer, got CBAM"):
        cbam.keras.to_torch(layer)
    with pytest.raises(TypeError, match="^to_torch: expected a cbam.keras CBAM, ChannelGate or SpatialGate layer"):
        cbam.keras.to_torch(keras.layers.Dense(3))
    bad = dict(state, **{"channel.fc1.weight": torch.zeros(4, 32)})
    with pytest.raises(ValueError, match=r"^from_torch: channel.fc1.weight has shape \(4, 32\), expected \(2, 32\)"):
        cbam.keras.from_torch(layer, bad)
    wide = {k: v for k, v in cbam.CBAM(32, kernel_size=3).state_dict().items()}
    with pytest.raises(ValueError, match=r"^from_torch: spatial.conv.weight has shape \(1, 2, 3, 3\), expected "
                                         r"\(1, 2, 7, 7\) for this CBAM$"):
        cbam.keras.from_torch(layer, wide)
    with pytest.raises(ValueError, match="^from_torch: missing key 'spatial.norm.weight' for this CBAM"):
        cbam.keras.from_torch(layer, {k: v for k, v in state.items() if k != "spatial.norm.weight"})
    with pytest.raises(ValueError, match="^from_torch: unexpected key 'spatial.conv.bias' for this CBAM"):
        cbam.keras.from_torch(layer, cbam.CBAM(32, spatial_bias=True).state_dict())
    with pytest.raises(ValueError, match=r"^from_torch: the module's pool_types is \('avg',\), the layer's"):
        cbam.keras.from_torch(layer, cbam.CBAM(32, pool_types=("avg",)))
    with pytest.raises(TypeError, match="^from_torch: a Keras CBAM takes a cbam.CBAM module or its state dict, "
                                        "got Linear$"):
        cbam.keras.from_torch(layer, torch.nn.Linear(2, 2))
    before = [w.copy() for w in layer.get_weights()]  # nothing written by the failed loads
    assert all(np.array_equal(a, b) for a, b in zip(before, layer.get_weights(), strict=True))
    with pytest.raises(ValueError, match="^from_torch: expected a built layer or a channel count, got SpatialGate"):
        cbam.keras.from_torch(cbam.keras.SpatialGate(), cbam.SpatialGate(8).state_dict())
    pairs = [(cbam.keras.ChannelGate(8, 2), cbam.ChannelGate(8, 2, gate="hard_sigmoid")),
             (cbam.keras.SpatialGate(8), cbam.SpatialGate(8, gate="hard_sigmoid"))]
    for gate, module in pairs:  # the gate function is checked for either gate alone
        with pytest.raises(ValueError, match="^from_torch: the module's gate is 'hard_sigmoid', the layer's 'sigmoid'"):
            cbam.keras.from_torch(gate, module)
        assert not gate.built


def test_failed_load_leaves_an_unbuilt_layer_unbuilt(randomize):
    """Keys and shapes are checked against the weights the layer would have, before it is built."""
    state = randomize(cbam.CBAM(32)).state_dict()
    failures = [
        (cbam.keras.CBAM(), {k: v for k, v in state.items() if k != "spatial.norm.weight"}, "missing key"),
        (cbam.keras.CBAM(32), dict(state, **{"channel.fc1.weight": torch.zeros(4, 32)}), "has shape"),
        (cbam.keras.CBAM(kernel_size=3), state, r"spatial.conv.weight has shape \(1, 2, 7, 7\), expected \(1, 2, 3,"),
        (cbam.keras.CBAM(spatial_bias=True), state, "missing key 'spatial.conv.bias'"),
        (cbam.keras.CBAM(16), state, "has shape"),
        (cbam.keras.CBAM(reduction=64), state, "reduction 64 leaves no hidden unit for 32 channels"),
        (cbam.keras.SpatialGate(compress="conv"),  # channels from compress.weight: a (1, 8, 1, 2) one is wrong
         cbam.SpatialGate(8, compress="conv").state_dict() | {"compress.weight": torch.zeros(1, 8, 1, 2)}, "has shape"),
    ]
    for layer, source, message in failures:
        with pytest.raises(ValueError, match=message) as e:
            cbam.keras.from_torch(layer, source)
        _message(e)
        assert not layer.built and not layer.weights, (type(layer).__name__, message)
    layer = failures[0][0]
    cbam.keras.from_torch(layer, state)  # the same layer then loads
    assert layer.built and layer.channels == 32
    for key, value in cbam.keras.to_torch(layer).items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------- the optional import
def test_import_cbam_does_not_import_keras_and_the_extra_is_named(tmp_path):
    """``import cbam`` leaves Keras alone; without Keras, ``import cbam.keras`` names the extra; with Keras and no
    backend chosen, PyTorch's is used when TensorFlow (Keras' default) is not installed."""
    code = (
        "import importlib.util, sys, cbam\n"
        "assert 'keras' not in sys.modules and 'cbam.keras' not in sys.modules\n"
        "sys.modules['keras'] = None  # as if Keras were not installed\n"
        "try:\n"
        "    import cbam.keras\n"
        "except ImportError as exc:\n"
        "    assert str(exc) == \"cbam.keras needs Keras 3, which is not installed: pip install 'cbam[keras]'\", exc\n"
        "else:\n"
        "    raise AssertionError('cbam.keras imported without keras')\n"
        "del sys.modules['keras']\n"
        "import cbam.keras, keras, os\n"
        "assert 'KERAS_BACKEND' not in os.environ, os.environ['KERAS_BACKEND']  # set for Keras' import only\n"
        "expected = 'tensorflow' if importlib.util.find_spec('tensorflow') else 'torch'\n"
        "assert keras.backend.backend() == expected, keras.backend.backend()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(tmp_path)  # no keras.json: Keras' default, TensorFlow
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)
