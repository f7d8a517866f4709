"""Keras is an optional extra: importing ``cbam.keras`` without Keras 3 says how to get it, in one line.

Keras' default backend is TensorFlow, which ``pip install 'cbam[keras]'`` does not install, while PyTorch is always
there (cbam needs it). So when nothing chose a backend (no ``KERAS_BACKEND``, and keras.json absent or at its
``tensorflow`` default) and TensorFlow is not installed, the PyTorch backend is chosen instead of failing. The choice
is made through ``KERAS_BACKEND`` for Keras' import only (Keras reads it then and never again): the variable is
removed afterwards, so child processes see the environment the user gave.
"""

from __future__ import annotations

import importlib.util
import json
import os


def _keras_dir() -> str:
    """Where Keras looks for keras.json: ``$KERAS_HOME``, else ``~/.keras``, else (home not writable) /tmp/.keras."""
    if "KERAS_HOME" in os.environ:
        return os.environ["KERAS_HOME"]
    base = os.path.expanduser("~")
    return os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")


def _configured_backend() -> str:
    """The backend keras.json names (Keras' own default when there is none or it cannot be read)."""
    try:
        with open(os.path.expanduser(os.path.join(_keras_dir(), "keras.json"))) as f:
            return str(json.load(f).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


_chose_torch = (
    not os.environ.get("KERAS_BACKEND")
    and importlib.util.find_spec("tensorflow") is None
    and _configured_backend() == "tensorflow"
)
if _chose_torch:
    _given = os.environ.get("KERAS_BACKEND")  # unset, or set empty (which Keras ignores)
    os.environ["KERAS_BACKEND"] = "torch"

try:
    import keras
except ImportError as exc:  # ModuleNotFoundError, or None in sys.modules
    if importlib.util.find_spec("keras") is None:
        raise ImportError("cbam.keras needs Keras 3, which is not installed: pip install 'cbam[keras]'") from exc
    backend = os.environ.get("KERAS_BACKEND") or _configured_backend()
    raise ImportError(
        f"cbam.keras: Keras failed to import with backend {backend!r} ({exc}); expected that backend installed, "
        "or KERAS_BACKEND=torch (installed with cbam)"
    ) from exc
finally:
    if _chose_torch:  # Keras has read it: leave the environment (and child processes') as it was
        if _given is None:
            os.environ.pop("KERAS_BACKEND", None)
        else:
            os.environ["KERAS_BACKEND"] = _given

if int(keras.__version__.split(".")[0]) < 3:
    raise ImportError(f"cbam.keras needs Keras 3, found Keras {keras.__version__}: pip install 'cbam[keras]'")

__all__ = ["keras"]
