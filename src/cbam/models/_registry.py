"""Model registry: every network of the CBAM paper (Woo et al., ECCV 2018) by name, with or without attention.

``create_model("resnet50", attention="cbam", reduction=8)`` is the one entry point the training, profiling
and command-line code share. Keyword arguments are routed by name: those the builder (or the network class
it wraps) accepts configure the network (``widen``, ``stride_in_1x1``, ``in_chans``, ...); all others
configure every attention module the network builds (``reduction``, ``kernel_size``, ``arrangement``, ...).
This keeps "the same network, another attention setting" a one-keyword change, as in the paper's ablations.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..layers import attention_name, get_attn

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_META: dict[str, dict[str, Any]] = {}

# Builder parameters create_model fills itself; never routed from **kwargs.
_RESERVED = ("attention", "num_classes", "attn_kwargs")


def register_model(fn: Builder | None = None, **meta: Any) -> Builder | Callable[[Builder], Builder]:
    """Register a model builder under its function name.

    Usable bare (``@register_model``) or with metadata (``@register_model(model_cls=ResNet, input_size=32)``).
    Known metadata: ``model_cls``, the network class whose keyword-only constructor arguments the builder
    forwards through ``**kwargs`` (so create_model can route them), ``input_size`` (the resolution the
    model is meant for, default 224) and ``paper`` (free text).
    """

    def decorate(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _MODELS and _MODELS[name] is not builder:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        _META[name] = {"input_size": 224, **meta}
        return builder

    return decorate if fn is None else decorate(fn)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is an fnmatch pattern such as ``"resnet*"``."""
    names = sorted(_MODELS)
    if pattern is not None:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def is_model(name: str) -> bool:
    return name in _MODELS


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(str(name), _MODELS, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"available: {', '.join(list_models())}"
    return ValueError(f"unknown model {name!r}; {hint}")


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The registered builder for ``name`` (a ValueError naming close matches if unknown)."""
    if name not in _MODELS:
        raise _unknown(name)
    return _MODELS[name]


def model_meta(name: str) -> dict[str, Any]:
    """The metadata given at registration (always has ``input_size``)."""
    model_entrypoint(name)
    return dict(_META[name])


def model_kwarg_names(name: str) -> frozenset[str]:
    """Keyword arguments that configure the network itself (everything else goes to the attention modules)."""
    builder = model_entrypoint(name)
    params = inspect.signature(builder).parameters
    names = {
        p.name
        for p in params.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in _RESERVED
    }
    cls = _META[name].get("model_cls")
    if cls is not None and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        names |= {
            p.name
            for p in inspect.signature(cls).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in _RESERVED
        }
    return frozenset(names)


def _attn_kwarg_names(attention: Any) -> frozenset[str] | None:
    """Keyword names the attention class accepts, or None when it takes ``**kwargs`` (cannot check)."""
    cls = get_attn(attention)
    if cls is None:
        return frozenset()
    params = list(inspect.signature(cls).parameters.values())[1:]  # drop ``channels``
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


def create_model(
    name: str,
    *,
    attention: str | type[nn.Module] | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build registered model ``name`` with ``attention`` ("se", "cbam", "bam", None or a class).

    ``num_classes=None`` keeps the builder's default (1000 for ImageNet models, 10 for the CIFAR ones).
    The returned model carries ``model_name``, ``attention`` (canonical name), ``model_kwargs`` and
    ``attn_kwargs``, enough to rebuild it.
    """
    builder = model_entrypoint(name)
    model_names = model_kwarg_names(name)
    model_kw = {k: v for k, v in kwargs.items() if k in model_names}
    attn_kw = {k: v for k, v in kwargs.items() if k not in model_names}
    attn = attention_name(attention)  # validates ``attention`` early with a clear message
    if attn_kw:
        accepted = _attn_kwarg_names(attention)
        if attn == "none":
            options = ", ".join(sorted(model_names))
            raise ValueError(
                f"create_model({name!r}): {', '.join(sorted(attn_kw))} "
                f"{'is an attention option' if len(attn_kw) == 1 else 'are attention options'} but attention "
                f"is None; pass attention='cbam', 'se' or 'bam' (network options: {options})"
            )
        unknown = sorted(set(attn_kw) - accepted) if accepted is not None else []
        if unknown:
            raise ValueError(
                f"create_model({name!r}): unknown keyword(s) {', '.join(unknown)}; network options: "
                f"{', '.join(sorted(model_names))}; {attn} options: {', '.join(sorted(accepted or ()))}"
            )
    if num_classes is not None:
        model_kw["num_classes"] = num_classes
    try:
        model = builder(attention=attention, attn_kwargs=attn_kw, **model_kw)
    except ValueError as exc:  # a module refused its configuration: say which model, in one line
        message = str(exc)
        if not message.startswith("create_model("):
            message = f"create_model({name!r}): {message}"
        raise ValueError(message) from None
    model.model_name = name
    model.attention = attn
    model.model_kwargs = dict(model_kw)
    model.attn_kwargs = dict(attn_kw)
    return model
