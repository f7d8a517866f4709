"""Reading a checkpoint file of any supported kind without trusting it.

Two containers: safetensors (tensors only; this package's digest in the metadata is checked when present) and
torch's pickle-based files, read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers
only and refuses any other object (so a pickle carrying code is refused, never run). This package's own training
checkpoints (``last.pt``) are read through :func:`cbam.train.checkpoint.load_checkpoint`, which checks their SHA-256
sidecar before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..train.checkpoint import INTEGRITY_KEY, CheckpointError, load_checkpoint, load_weights

__all__ = ["Checkpoint", "read_checkpoint", "state_dict_of"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


@dataclass
class Checkpoint:
    """What a checkpoint file holds: its object (a state dict or a dict around one), the safetensors metadata (empty
    for torch files), the SHA-256 of the file's bytes and the container (``"safetensors"`` or ``"torch"``)."""

    path: Path
    state: Mapping[str, Any]
    sha256: str
    container: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ours(self) -> bool:
        """Written by this package (its training or ``cbam convert``): it says so in its metadata or wrapper."""
        meta = self.metadata
        return meta.get("format") == "cbam" or ("sha256" in meta and "model" in meta) or self.container == "cbam-pt"


def _is_safetensors(head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The informative line of an error: torch.load's weights_only refusal starts with advice to load unsafely,
    which is skipped; what it refused comes after."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_BOILERPLATE)] or lines
    return useful[0][:limit] if useful else type(exc).__name__


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The contents of ``path``; a file that is missing, corrupt or holds anything but tensors and plain containers
    is a ValueError (:class:`~cbam.train.checkpoint.CheckpointError`) in one line naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror})") from None
    digest = hashlib.sha256(data).hexdigest()
    if _is_safetensors(data[:9], len(data)):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({_first_line(exc)})") from None
        return Checkpoint(path, load_weights(path), digest, "safetensors", metadata)  # digest checked if it has one
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a refused global, a bad zip, not a pickle: all mean "not readable"
        raise CheckpointError(
            f"checkpoint {path} is neither safetensors nor a torch file that loads with weights_only=True "
            f"({_first_line(exc)})"
        ) from None
    if isinstance(state, Mapping) and INTEGRITY_KEY in state:  # this package's training checkpoint: check its digest
        return Checkpoint(path, load_checkpoint(path), digest, "cbam-pt")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}; expected a state dict")
    return Checkpoint(path, state, digest, "torch")


def state_dict_of(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The flat state dict inside a checkpoint's object: itself, its ``state_dict`` (the release's and timm's
    training checkpoints) or its ``model`` entry (this package's), with a ``module.`` / ``_orig_mod.`` prefix that
    every key shares removed. Anything but tensors in it is a ValueError."""
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    for wrapper in ("state_dict", "model"):
        inner = state.get(wrapper)
        if isinstance(inner, Mapping) and not isinstance(inner, torch.Tensor):
            state = inner
            break
    if not state:
        raise ValueError("expected a state dict of tensors, got an empty one")
    bad = [(k, v) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        key, value = bad[0]
        raise ValueError(f"expected a state dict of tensors; entry {key!r} is a {type(value).__name__}")
    flat = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in flat):
            flat = {k[len(prefix):]: v for k, v in flat.items()}
    return flat
