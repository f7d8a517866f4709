"""CBAM as Keras 3 layers: the PyTorch module's options, presets and initialisation, written with ``keras.ops`` only.

Written once against ``keras.ops`` so the same layer runs on the TensorFlow, JAX and PyTorch backends. The presets and
the hidden-width rule come from :mod:`cbam.layers.cbam`, so the two implementations cannot drift apart; the weights
keep the PyTorch module's meaning (see :mod:`cbam.keras.convert` for the layouts). The spatial BatchNorm is written
out rather than taken from ``keras.layers.BatchNormalization`` because PyTorch's differs in two places that matter for
weight parity: the momentum convention (PyTorch m is Keras 1 - m) and the running variance, which PyTorch updates with
the unbiased batch variance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..layers._checks import check_choice, check_odd_kernel, check_positive_int
from ..layers.cbam import POOL_TYPES, PRESETS, SPATIAL_COMPRESSIONS, hidden_width, preset_options
from ._require import keras

ops = keras.ops

DATA_FORMATS = ("channels_last", "channels_first")
ACTIVATIONS = ("relu", "gelu", "silu")
GATES = ("sigmoid", "hard_sigmoid")
INITS = ("release", "seed", "torch")

__all__ = ["ACTIVATIONS", "CBAM", "DATA_FORMATS", "GATES", "INITS", "ChannelGate", "SpatialGate", "cbam_block"]


def _check_name(module: str, what: str, value: object, choices: tuple[str, ...]) -> str:
    """A string option: TypeError for a non-string (PyTorch classes do not carry over), ValueError for a bad name."""
    if not isinstance(value, str):
        raise TypeError(f"{module}: {what} must be one of {', '.join(map(repr, choices))}, got {type(value).__name__}")
    return check_choice(module, what, value, choices)


def _activation(name: str, x: Any) -> Any:
    if name == "relu":
        return ops.relu(x)
    if name == "gelu":
        return ops.gelu(x, approximate=False)  # nn.GELU's default is the exact erf form
    return ops.silu(x)


def _gate(name: str, x: Any) -> Any:
    if name == "sigmoid":
        return ops.sigmoid(x)
    return ops.relu6(x + 3.0) / 6.0  # nn.Hardsigmoid, whatever a backend's own hard_sigmoid uses


def _widened(x: Any) -> Any:
    """``x`` in float32 when it is float16 / bfloat16 (mixed precision): sums and statistics that overflow there."""
    if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16"):
        return ops.cast(x, "float32")
    return x


def _conv(x: Any, kernel: Any, padding: str, data_format: str) -> Any:
    """``ops.conv``; channels_first runs channels_last on TensorFlow, whose CPU Conv2D has no NCHW kernel (float64)."""
    if data_format == "channels_first" and keras.backend.backend() == "tensorflow":
        y = ops.conv(ops.transpose(x, (0, 2, 3, 1)), kernel, padding=padding, data_format="channels_last")
        return ops.transpose(y, (0, 3, 1, 2))
    return ops.conv(x, kernel, padding=padding, data_format=data_format)


def _mean(x: Any, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Any:
    """``ops.mean``, except that a float64 mean stays float64: off TensorFlow, Keras' type promotion computes it in
    float32 (as JAX without x64), so a float64 layer would not match the PyTorch module in float64."""
    if keras.backend.standardize_dtype(x.dtype) == "float64":
        axes = range(len(x.shape)) if axis is None else (axis,) if isinstance(axis, int) else axis
        sizes = [x.shape[a] for a in axes]
        if all(isinstance(n, int) for n in sizes):
            return ops.sum(x, axis=axis, keepdims=keepdims) / math.prod(sizes)
    return ops.mean(x, axis=axis, keepdims=keepdims)


def _pool(x: Any, pool_type: str, axes: tuple[int, int]) -> Any:
    """(N, C) descriptor of a feature map over its two spatial axes, as ``cbam.layers.cbam.pool_channels``."""
    if pool_type == "avg":
        return _mean(x, axis=axes)
    if pool_type == "max":
        return ops.max(x, axis=axes)
    # the sums of the other two are taken in float32 under mixed precision (a sum of squares overflows float16)
    if pool_type == "lp":  # the release's LP pool: p = 2 with a sum, i.e. the L2 norm
        s = ops.sum(ops.square(_widened(x)), axis=axes)
        positive = s > 0  # an all-zero channel: norm 0 and gradient 0, as torch.linalg.vector_norm (not sqrt's NaN)
        return ops.cast(ops.where(positive, ops.sqrt(ops.where(positive, s, 1.0)), 0.0), x.dtype)
    return ops.cast(ops.logsumexp(_widened(x), axis=axes), x.dtype)


def _initializer(kind: str, init: str, fan_in: int) -> keras.initializers.Initializer:
    """What ``CBAM.reset_parameters`` does per init scheme, as Keras initializers (Keras counts fans as PyTorch)."""
    if kind == "bias":
        if init in ("release", "seed"):
            return keras.initializers.Zeros()
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear / nn.Conv2d default bias
        return keras.initializers.RandomUniform(-bound, bound)
    if init == "seed":
        return keras.initializers.GlorotUniform()
    if init == "release" and kind == "conv":  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
        return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")
    # PyTorch's default kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in))
    return keras.initializers.VarianceScaling(1.0 / 3.0, mode="fan_in", distribution="uniform")


class _FeatureMapLayer(keras.layers.Layer):
    """Shared checks: one clear error for a wrong rank, channel count or dtype instead of a silent broadcast."""

    def __init__(self, channels: int | None, data_format: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        name = type(self).__name__
        self.channels = None if channels is None else check_positive_int(name, "channels", channels)
        self.data_format = _check_name(name, "data_format", data_format, DATA_FORMATS)
        self.channel_axis = -1 if data_format == "channels_last" else 1
        self.spatial_axes = (1, 2) if data_format == "channels_last" else (2, 3)

    def _check_shape(self, shape: Sequence[int | None]) -> int:
        """The input's channel count, after checking rank and (when fixed) the count itself."""
        name = type(self).__name__
        shape = tuple(shape)
        layout = "(N, H, W, C)" if self.data_format == "channels_last" else "(N, C, H, W)"
        if len(shape) != 4:
            raise ValueError(f"{name}: expected a 4-D input {layout} ({self.data_format}), got shape {shape}")
        channels = shape[self.channel_axis]
        if channels is None:
            raise ValueError(f"{name}: expected a known channel count on axis {self.channel_axis}, got shape {shape}")
        if self.channels is not None and channels != self.channels:
            raise ValueError(
                f"{name}: expected {self.channels} channels, got {channels} (input shape {shape}, {self.data_format})"
            )
        return int(channels)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # checked before Keras' __call__, which would wrap an error raised in call() in a multi-line report
        inputs = args[0] if args else kwargs.get("inputs")
        if hasattr(inputs, "shape") and hasattr(inputs, "dtype"):
            self._check_shape(inputs.shape)
            dtype = keras.backend.standardize_dtype(inputs.dtype)
            if not keras.backend.is_float_dtype(dtype):
                raise TypeError(f"{type(self).__name__}: expected a floating-point input, got dtype {dtype}")
        return super().__call__(*args, **kwargs)

    def _broadcast(self, per_channel: Any) -> Any:
        """(N, C) -> (N, 1, 1, C) or (N, C, 1, 1), to scale a feature map of this layer's data format."""
        if self.data_format == "channels_last":
            return per_channel[:, None, None, :]
        return per_channel[:, :, None, None]

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        self._check_shape(input_shape)
        return tuple(input_shape)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(channels=self.channels, data_format=self.data_format)
        return config


@keras.saving.register_keras_serializable(package="cbam")
class ChannelGate(_FeatureMapLayer):
    """Channel attention ("what"): a shared MLP over pooled H x W descriptors, outputs summed, then a gate.

    The Keras twin of ``cbam.ChannelGate``: weights ``fc1_kernel`` [C, hidden] (+ ``fc1_bias``) and ``fc2_kernel``
    [hidden, C] (+ ``fc2_bias``); with ``layers=1`` (Ultralytics' form) one C -> C layer ``fc1`` and no ``fc2``.
    ``init`` picks the initialisation scheme of a preset (``"torch"``: PyTorch's layer defaults).
    """

    def __init__(
        self,
        channels: int | None = None,
        reduction: int = 16,
        *,
        hidden: int | None = None,
        pool_types: Sequence[str] = ("avg", "max"),
        bias: bool = True,
        act_layer: str = "relu",
        gate: str = "sigmoid",
        hidden_rounding: str = "floor",
        layers: int = 2,
        init: str = "torch",
        data_format: str = "channels_last",
        **kwargs: Any,
    ) -> None:
        super().__init__(channels, data_format, **kwargs)
        name = type(self).__name__
        if layers not in (1, 2) or isinstance(layers, bool):
            raise ValueError(f"{name}: layers must be 1 (one C -> C layer) or 2 (the MLP), got {layers!r}")
        if isinstance(pool_types, str):
            pool_types = (pool_types,)
        pool_types = tuple(pool_types)
        if not pool_types:
            raise ValueError(f"{name}: pool_types must be a non-empty subset of {POOL_TYPES}, got ()")
        for p in pool_types:
            check_choice(name, "pool type", p, POOL_TYPES)
        if len(set(pool_types)) != len(pool_types):
            raise ValueError(f"{name}: pool_types must not repeat a pool type, got {pool_types}")
        if layers == 2:
            check_positive_int(name, "reduction", reduction)
        self.reduction = reduction
        self.hidden = None if hidden is None else check_positive_int(name, "hidden", hidden)
        self.pool_types = pool_types
        self.bias = bool(bias)
        self.act_layer = _check_name(name, "act_layer", act_layer, ACTIVATIONS)
        self.gate = _check_name(name, "gate", gate, GATES)
        self.hidden_rounding = hidden_rounding
        self.layers = layers
        self.init = _check_name(name, "init", init, INITS)
        # the width is known as soon as the channel count is: a reduction leaving no hidden unit fails here, not later
        self.hidden_units = None if self.channels is None else self._hidden_for(self.channels)

    def _hidden_for(self, channels: int) -> int:
        name = type(self).__name__
        if self.layers == 1:
            if self.hidden not in (None, channels):
                raise ValueError(
                    f"{name}: a single-layer gate maps {channels} channels to {channels}, got hidden={self.hidden}"
                )
            return channels
        if self.hidden is not None:
            return self.hidden
        return hidden_width(name, channels, self.reduction, self.hidden_rounding)

    def weight_shapes(self, channels: int) -> dict[str, tuple[int, ...]]:
        """The weights :meth:`build` creates for ``channels`` input channels: attribute name -> shape, in order."""
        hidden = self._hidden_for(channels)
        shapes = {"fc1_kernel": (channels, hidden)}
        if self.bias:
            shapes["fc1_bias"] = (hidden,)
        if self.layers == 2:
            shapes["fc2_kernel"] = (hidden, channels)
            if self.bias:
                shapes["fc2_bias"] = (channels,)
        return shapes

    def build(self, input_shape: Sequence[int | None]) -> None:
        channels = self._check_shape(input_shape)
        shapes = self.weight_shapes(channels)
        self.channels, self.hidden_units = channels, self._hidden_for(channels)
        fan_in = {"fc1": channels, "fc2": self.hidden_units}
        for name in ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias"):
            kind = "dense" if name.endswith("kernel") else "bias"
            setattr(self, name, self.add_weight(
                name=name, shape=shapes[name], initializer=_initializer(kind, self.init, fan_in[name[:3]])
            ) if name in shapes else None)

    def logits(self, x: Any) -> Any:
        """Pre-gate channel attention, shaped to scale ``x``: (N, 1, 1, C) or (N, C, 1, 1)."""
        pooled = ops.stack([_pool(x, p, self.spatial_axes) for p in self.pool_types])  # (P, N, C), one MLP call
        # einsum, not matmul: Keras' matmul computes float64 in float32 off TensorFlow (as _mean says)
        out = ops.einsum("pnc,ch->pnh", pooled, self.fc1_kernel)
        if self.fc1_bias is not None:
            out = out + self.fc1_bias
        if self.fc2_kernel is not None:
            out = ops.einsum("pnh,hc->pnc", _activation(self.act_layer, out), self.fc2_kernel)
            if self.fc2_bias is not None:
                out = out + self.fc2_bias
        return self._broadcast(ops.sum(out, axis=0))

    def call(self, inputs: Any) -> Any:
        return inputs * _gate(self.gate, self.logits(inputs))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            reduction=self.reduction,
            hidden=self.hidden,
            pool_types=list(self.pool_types),
            bias=self.bias,
            act_layer=self.act_layer,
            gate=self.gate,
            hidden_rounding=self.hidden_rounding,
            layers=self.layers,
            init=self.init,
        )
        return config


@keras.saving.register_keras_serializable(package="cbam")
class SpatialGate(_FeatureMapLayer):
    """Spatial attention ("where"): [avg; max] over channels (or a learned 1 x 1 conv), a k x k conv, a gate.

    The Keras twin of ``cbam.SpatialGate``: ``conv_kernel`` [k, k, 2, 1] (input 0 = channel average, 1 = channel
    max), ``conv_bias`` [1] when biased, ``compress_kernel`` [1, 1, C, 1] for ``compress="conv"``, and with
    ``norm=True`` a BatchNorm of the single map with PyTorch's semantics: ``bn_momentum`` is PyTorch's (the weight of
    the new batch statistic), training normalises with the biased batch variance and updates ``moving_variance``
    with the unbiased one, and a single value (batch 1 at 1 x 1) is normalised with the running statistics.
    ``num_batches_tracked`` counts updates, as PyTorch's buffer does. A layer set ``trainable=False`` uses its
    running statistics even when training, as Keras' own BatchNormalization does.
    """

    def __init__(
        self,
        channels: int | None = None,
        kernel_size: int = 7,
        *,
        compress: str = "pool",
        bias: bool = False,
        norm: bool = True,
        bn_momentum: float = 0.01,
        bn_eps: float = 1e-5,
        gate: str = "sigmoid",
        init: str = "torch",
        data_format: str = "channels_last",
        **kwargs: Any,
    ) -> None:
        super().__init__(channels, data_format, **kwargs)
        name = type(self).__name__
        self.kernel_size = check_odd_kernel(name, kernel_size)
        self.compress = _check_name(name, "spatial compression", compress, SPATIAL_COMPRESSIONS)
        self.bias = bool(bias)
        self.norm = bool(norm)
        if isinstance(bn_momentum, bool) or not isinstance(bn_momentum, (int, float)) or not 0 <= bn_momentum <= 1:
            raise ValueError(f"{name}: bn_momentum must be a number in [0, 1] (PyTorch's convention), "
                             f"got {bn_momentum!r}")
        if isinstance(bn_eps, bool) or not isinstance(bn_eps, (int, float)) or bn_eps <= 0:
            raise ValueError(f"{name}: bn_eps must be a positive number, got {bn_eps!r}")
        self.bn_momentum = float(bn_momentum)
        self.bn_eps = float(bn_eps)
        self.gate = _check_name(name, "gate", gate, GATES)
        self.init = _check_name(name, "init", init, INITS)

    def weight_shapes(self, channels: int) -> dict[str, tuple[int, ...]]:
        """The weights :meth:`build` creates for ``channels`` input channels: attribute name -> shape, in order."""
        k, maps = self.kernel_size, 2 if self.compress == "pool" else 1
        shapes: dict[str, tuple[int, ...]] = {}
        if self.compress == "conv":
            shapes["compress_kernel"] = (1, 1, channels, 1)
        shapes["conv_kernel"] = (k, k, maps, 1)
        if self.bias:
            shapes["conv_bias"] = (1,)
        if self.norm:
            shapes.update(gamma=(1,), beta=(1,), moving_mean=(1,), moving_variance=(1,), num_batches_tracked=())
        return shapes

    def build(self, input_shape: Sequence[int | None]) -> None:
        channels = self.channels = self._check_shape(input_shape)
        shapes = self.weight_shapes(channels)
        fan_in = math.prod(shapes["conv_kernel"][:3])
        self.compress_kernel = self.conv_bias = None
        if "compress_kernel" in shapes:
            self.compress_kernel = self.add_weight(name="compress_kernel", shape=shapes["compress_kernel"],
                                                   initializer=_initializer("conv", self.init, channels))
        self.conv_kernel = self.add_weight(
            name="conv_kernel", shape=shapes["conv_kernel"], initializer=_initializer("conv", self.init, fan_in)
        )
        if "conv_bias" in shapes:
            self.conv_bias = self.add_weight(name="conv_bias", shape=shapes["conv_bias"],
                                             initializer=_initializer("bias", self.init, fan_in))
        self.gamma = self.beta = self.moving_mean = self.moving_variance = self.num_batches_tracked = None
        if self.norm:
            # the release starts the norm's weight at 0, so the spatial gate starts at exactly 0.5
            self.gamma = self.add_weight(name="gamma", shape=shapes["gamma"],
                                         initializer="zeros" if self.init == "release" else "ones")
            self.beta = self.add_weight(name="beta", shape=shapes["beta"], initializer="zeros")
            # the statistics are never autocast (as Keras' BatchNormalization's): under mixed precision they stay
            # float32 and are updated in place, not through a float16 copy
            self.moving_mean = self.add_weight(name="moving_mean", shape=shapes["moving_mean"], initializer="zeros",
                                               trainable=False, autocast=False)
            self.moving_variance = self.add_weight(name="moving_variance", shape=shapes["moving_variance"],
                                                   initializer="ones", trainable=False, autocast=False)
            self.num_batches_tracked = self.add_weight(name="num_batches_tracked", shape=shapes["num_batches_tracked"],
                                                       dtype="int32", initializer="zeros", trainable=False,
                                                       autocast=False)

    def compressed(self, x: Any) -> Any:
        """The maps the k x k conv sees: [mean over C; max over C], or the learned 1 x 1 conv."""
        if self.compress == "pool":
            axis = self.channel_axis
            return ops.concatenate([_mean(x, axis=axis, keepdims=True), ops.max(x, axis=axis, keepdims=True)],
                                   axis=axis)
        return _conv(x, self.compress_kernel, "valid", self.data_format)

    def logits(self, x: Any, training: bool | None = None) -> Any:
        """Pre-gate spatial attention: (N, H, W, 1) or (N, 1, H, W)."""
        s = _conv(self.compressed(x), self.conv_kernel, "same", self.data_format)
        if self.conv_bias is not None:
            s = s + self.conv_bias  # one map: a shape-(1,) bias broadcasts in either layout
        if self.norm:
            s = self._normalise(s, bool(training) and self.trainable)
        return s

    def _normalise(self, s: Any, training: bool) -> Any:
        dtype = s.dtype
        out = self._normalise_wide(_widened(s), training)  # float32 under mixed precision, as Keras' BatchNorm
        return ops.cast(out, dtype)

    def _normalise_wide(self, s: Any, training: bool) -> Any:
        eps = self.bn_eps
        gamma, beta = ops.cast(self.gamma, s.dtype), ops.cast(self.beta, s.dtype)
        moving_mean, moving_variance = ops.cast(self.moving_mean, s.dtype), ops.cast(self.moving_variance, s.dtype)
        running = (s - moving_mean) * ops.rsqrt(moving_variance + eps) * gamma + beta
        if not training:
            return running
        static = all(isinstance(d, int) for d in s.shape)
        count = math.prod(s.shape) if static else ops.cast(ops.size(s), s.dtype)
        if static and count <= 1:  # BatchNorm has no batch statistics of a single value: as the PyTorch module
            return running
        mean = _mean(s)
        var = _mean(ops.square(s - mean))  # biased: what the normalisation uses
        out = (s - mean) * ops.rsqrt(var + eps) * gamma + beta
        # count / (count - 1) first: var * count alone overflows float16 past 65504 values
        unbiased = var * (count / (count - 1)) if static else var * (count / ops.maximum(count - 1.0, 1.0))
        m = self.bn_momentum
        new_mean = ops.stop_gradient(moving_mean * (1.0 - m) + mean * m)
        new_var = ops.stop_gradient(moving_variance * (1.0 - m) + unbiased * m)
        new_count = self.num_batches_tracked + 1
        if not static:  # e.g. TensorFlow graphs with an unknown batch: choose per call what static shapes choose here
            use_batch = count > 1.0
            out = ops.where(use_batch, out, running)
            new_mean = ops.where(use_batch, new_mean, moving_mean)
            new_var = ops.where(use_batch, new_var, moving_variance)
            new_count = ops.where(use_batch, new_count, self.num_batches_tracked)
        self.moving_mean.assign(ops.cast(new_mean, self.moving_mean.dtype))
        self.moving_variance.assign(ops.cast(new_var, self.moving_variance.dtype))
        self.num_batches_tracked.assign(new_count)
        return out

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return inputs * _gate(self.gate, self.logits(inputs, training))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            kernel_size=self.kernel_size,
            compress=self.compress,
            bias=self.bias,
            norm=self.norm,
            bn_momentum=self.bn_momentum,
            bn_eps=self.bn_eps,
            gate=self.gate,
            init=self.init,
        )
        return config


@keras.saving.register_keras_serializable(package="cbam")
class CBAM(_FeatureMapLayer):
    """Convolutional Block Attention Module for Keras 3: channel gate (``channel``) then spatial gate (``spatial``).

    Same arguments, presets and errors as ``cbam.CBAM`` (``preset="paper" | "seed" | "timm" | "ultralytics"``;
    explicit keywords override the preset), plus ``data_format`` (``"channels_last"``, NHWC, by default). The
    channel count may be left out (``None``): it is then read from the input when the layer is built. ``act_layer``
    and ``gate`` take names only (``"relu"``, ``"gelu"``, ``"silu"``; ``"sigmoid"``, ``"hard_sigmoid"``).
    ``cbam.keras.from_torch`` / ``to_torch`` move weights from and to the PyTorch module.
    """

    def __init__(
        self,
        channels: int | None = None,
        reduction: int | None = None,
        *,
        preset: str = "paper",
        hidden: int | None = None,
        pool_types: Sequence[str] | None = None,
        spatial: bool = True,
        spatial_compress: str = "pool",
        kernel_size: int = 7,
        arrangement: str = "channel_first",
        spatial_norm: bool | None = None,
        spatial_bias: bool | None = None,
        mlp_bias: bool | None = None,
        bn_momentum: float | None = None,
        act_layer: str = "relu",
        gate: str = "sigmoid",
        data_format: str = "channels_last",
        **kwargs: Any,
    ) -> None:
        super().__init__(channels, data_format, **kwargs)
        name = type(self).__name__
        p = PRESETS[check_choice(name, "preset", preset, tuple(PRESETS))]
        if isinstance(pool_types, str):
            pool_types = (pool_types,)
        channel_options, spatial_options = preset_options(
            name, p, preset, self.channels, reduction=reduction, hidden=hidden, pool_types=pool_types,
            spatial=spatial, arrangement=arrangement, mlp_bias=mlp_bias, spatial_bias=spatial_bias,
            spatial_norm=spatial_norm, bn_momentum=bn_momentum,
        )
        self.arrangement = arrangement
        self.preset = preset
        # the options as given (None: the preset's), for get_config; a tuple, so Keras does not wrap it in a tracker
        self.options = tuple(dict(
            reduction=reduction, hidden=hidden, pool_types=None if pool_types is None else tuple(pool_types),
            spatial=bool(spatial), spatial_compress=spatial_compress, kernel_size=kernel_size,
            spatial_norm=spatial_norm, spatial_bias=spatial_bias, mlp_bias=mlp_bias, bn_momentum=bn_momentum,
            act_layer=act_layer, gate=gate,
        ).items())
        self.channel = ChannelGate(
            self.channels,
            act_layer=act_layer,
            gate=gate,
            init=p.init,
            data_format=data_format,
            dtype=self.dtype_policy,  # the gates compute in CBAM's own dtype
            name="channel",
            **channel_options,
        )
        self.gate = self.channel.gate  # checked by the channel gate, as the PyTorch module's error says
        self.spatial = (
            SpatialGate(
                self.channels,
                kernel_size,
                compress=spatial_compress,
                gate=gate,
                init=p.init,
                data_format=data_format,
                dtype=self.dtype_policy,
                name="spatial",
                **spatial_options,
            )
            if spatial
            else None
        )

    def build(self, input_shape: Sequence[int | None]) -> None:
        channels = self.channels = self._check_shape(input_shape)
        shape = tuple(input_shape)
        if self.channel.channels is None:  # a count left out: both gates take the input's
            self.channel.channels = channels
        self.channel.build(shape)
        if self.spatial is not None:
            if self.spatial.channels is None:
                self.spatial.channels = channels
            self.spatial.build(shape)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        x = inputs
        channel, spatial, gate = self.channel, self.spatial, self.gate
        if spatial is None:
            return x * _gate(gate, channel.logits(x))
        if self.arrangement == "channel_first":
            x = x * _gate(gate, channel.logits(x))
            return x * _gate(gate, spatial.logits(x, training))
        if self.arrangement == "spatial_first":
            x = x * _gate(gate, spatial.logits(x, training))
            return x * _gate(gate, channel.logits(x))
        return x * _gate(gate, channel.logits(x) + spatial.logits(x, training))  # parallel: one gate of the sum

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        options = {key: list(value) if isinstance(value, tuple) else value for key, value in self.options}
        config.update(preset=self.preset, arrangement=self.arrangement, **options)
        return config


def cbam_block(feature_map: Any, channels: int | None = None, **options: Any) -> Any:
    """Refine ``feature_map`` with a new :class:`CBAM` layer and return the result: the seed's shape of use.

    Written for the functional API (``x = cbam_block(x)`` between two layers); ``options`` are :class:`CBAM`'s
    (``preset="seed"`` for the seed's own module, ``name=`` to name the layer). It also works on a concrete tensor.
    """
    return CBAM(channels, **options)(feature_map)
