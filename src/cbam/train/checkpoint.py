"""Checkpoints that survive interruption and trust nothing.

Written atomically (temporary file in the same folder, flush, fsync, rename), so the previous good file is
never replaced by a half-written one, and with the mode of every other output (``0o666`` less the umask).

Every file carries a SHA-256 digest of its contents, checked on every load:

* a torch checkpoint (``last.pt``, ``best.pt``) has a sidecar ``<name>.sha256`` in ``sha256sum`` format, the
  digest of the file's bytes. The bytes are hashed and checked *before* ``torch.load(weights_only=True)`` sees
  them, so a flipped bit is refused before anything is unpickled; no arbitrary object is ever unpickled.
* final weights (``model.safetensors``) hold in their metadata (``sha256``) a digest over every tensor's name,
  dtype, shape and bytes, recomputed when the file is read.

``save_checkpoint(..., keep_previous=True)`` (``last.pt``) first keeps the current file as ``<stem>.prev.pt``, so a
corrupt ``last`` can fall back to the one before it; at every moment at least one (file, digest) pair on disk is
whole. Files written before digests existed still load, with a warning that they carry none.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

DIGEST_SUFFIX = ".sha256"
WEIGHTS_DIGEST_KEY = "sha256"
# Stored in every checkpoint written with a sidecar: such a file found without its sidecar is refused, not
# taken for one written before digests existed.
INTEGRITY_KEY = "integrity"
INTEGRITY_VALUE = "sha256-sidecar"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, truncated, corrupt or not ours); one line, naming the file."""


# ------------------------------------------------------------------------------------------ writing files
def _create_temp(path: Path) -> Path:
    """A new empty file beside ``path``, created with mode 0o666 so that the umask decides (as for any output)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write, before_replace=None) -> Path:
    """Call ``write(tmp_path)`` then move the finished file over ``path`` in one rename; ``before_replace(tmp_path)``,
    if given, runs on the finished, synced file first (a check that raises leaves ``path`` untouched).

    The file gets mode ``0o666`` masked by the process umask, like every file ``open(..., "w")`` makes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    mode = tmp.stat().st_mode & 0o777  # 0o666 less the umask
    try:
        write(str(tmp))
        if tmp.stat().st_mode & 0o777 != mode:  # a writer that replaced the file (safetensors does) reset it
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _write_bytes(tmp: str, data: bytes) -> None:
    with open(tmp, "wb") as f:
        f.write(data)


# ------------------------------------------------------------------------------------------ digests
def digest_path(path: str | Path) -> Path:
    """The sidecar holding ``path``'s SHA-256: ``last.pt`` -> ``last.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def previous_path(path: str | Path) -> Path:
    """Where ``save_checkpoint(..., keep_previous=True)`` keeps the file it replaces: last.pt -> last.prev.pt."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_digest(path: Path, digest: str) -> None:
    """``<digest>  <name>`` (``sha256sum -c`` reads it), written atomically."""
    line = f"{digest}  {path.name}\n".encode()
    atomic_write(digest_path(path), lambda tmp: _write_bytes(tmp, line))


def _read_digest(path: Path) -> str | None:
    """The digest recorded for ``path``, None when it has no sidecar; a malformed sidecar is a CheckpointError."""
    sidecar = digest_path(path)
    try:
        text = sidecar.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read its digest {sidecar} ({exc.strerror})") from None
    fields = text.split()
    digest = fields[0].lower() if fields else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise CheckpointError(f"checkpoint {path}: its digest file {sidecar} is malformed (expected a SHA-256)")
    return digest


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (what ``model.safetensors`` holds)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ torch checkpoints
def save_checkpoint(path: str | Path, state: dict[str, Any], *, keep_previous: bool = False) -> Path:
    """Write ``state`` to ``path`` with its SHA-256 sidecar, both atomically; the written bytes are read back and
    checked before they replace anything.

    With ``keep_previous`` the file being replaced (if whole) becomes ``<stem>.prev<suffix>`` with its digest first.
    Order: new file checked -> previous kept (digest, then file) -> new digest -> new file, so a crash at any point
    leaves at least one file that matches its digest.
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save({**state, INTEGRITY_KEY: INTEGRITY_VALUE}, buffer)
    data = buffer.getbuffer()
    digest = hashlib.sha256(data).hexdigest()

    def check_then_keep(tmp: Path) -> None:
        if _sha256_file(tmp) != digest:
            raise OSError(f"checkpoint {path}: the bytes read back differ from those written; nothing replaced")
        if keep_previous:
            _keep_previous(path)
        _write_digest(path, digest)

    return atomic_write(path, lambda tmp: _write_bytes(tmp, data), check_then_keep)


def _keep_previous(path: Path) -> None:
    """Keep ``path`` as ``<stem>.prev<suffix>`` (hard link, else copy) when it matches its digest."""
    if not path.is_file():
        return
    old = _read_digest(path) if digest_path(path).exists() else None
    if old is None or _sha256_file(path) != old:
        return  # a file without digest, or one that no longer matches it, is no good fallback
    prev = previous_path(path)
    _write_digest(prev, old)
    tmp = path.with_name(f".{prev.name}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, prev)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def verify_checkpoint(path: str | Path) -> bytes:
    """The bytes of ``path`` once they match its digest (a CheckpointError if not); legacy files: a warning."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    expected = _read_digest(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror})") from None
    if expected is None:
        return data
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} failed its integrity check, corrupt or truncated since it was "
                              f"written (SHA-256 {actual[:12]}... of its bytes, {expected[:12]}... recorded in "
                              f"{digest_path(path).name})")
    return data


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state, after its digest is checked; read with ``torch.load(weights_only=True)``."""
    path = Path(path)
    data = verify_checkpoint(path)
    has_digest = digest_path(path).exists()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, refused global: all mean "not a good checkpoint"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason[:160]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a cbam checkpoint (expected a dict with a 'model' entry)")
    marked = state.pop(INTEGRITY_KEY, None) == INTEGRITY_VALUE
    if not has_digest:
        if marked:
            raise CheckpointError(f"checkpoint {path}: its digest file {digest_path(path).name} is missing, so its "
                                  "contents cannot be checked")
        logger.warning("checkpoint %s carries no digest (written before checkpoints had one); loaded unchecked",
                       path)
    return state



def load_checkpoint_or_previous(path: str | Path) -> tuple[dict[str, Any], Path, str | None]:
    """``path``'s state, or, when ``path`` fails its checks, that of the previous good one (``<stem>.prev<suffix>``).

    Returns (state, the file read, None or the one line to log about the fallback). Nothing on disk is changed:
    the next ``save_checkpoint(..., keep_previous=True)`` keeps the good previous file, not the bad one.
    """
    path = Path(path)
    try:
        return load_checkpoint(path), path, None
    except CheckpointError as exc:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        try:
            state = load_checkpoint(prev)
        except CheckpointError as prev_exc:
            raise CheckpointError(f"{exc}; the previous checkpoint is no good either: {prev_exc}") from None
        return state, prev, f"{exc}; using the previous good checkpoint {prev}"

# ------------------------------------------------------------------------------------------ safetensors weights
def save_weights(path: str | Path, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> Path:
    """Final weights as .safetensors (tensors only, contiguous, shared storage broken), with their digest in the
    metadata (``sha256``); the written file is read back and checked before it replaces anything."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {**(metadata or {}), WEIGHTS_DIGEST_KEY: tensors_digest(tensors)}

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=meta)
        load_weights(tmp)  # read back: raises if what landed on disk is not what was meant

    return atomic_write(path, write)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, after the digest in its metadata is recomputed and compared."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights {path} do not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"weights {path} are corrupt or truncated ({reason})") from None
    expected = metadata.get(WEIGHTS_DIGEST_KEY)
    if expected is None:
        logger.warning("weights %s carry no digest (written before weights had one); loaded unchecked", path)
        return tensors
    actual = tensors_digest(tensors)
    if actual != expected:
        raise CheckpointError(f"weights {path} failed their integrity check, corrupt or truncated since they were "
                              f"written (SHA-256 {actual[:12]}... of the tensors, {expected[:12]}... recorded in the "
                              "file's metadata)")
    return tensors


# ------------------------------------------------------------------------------------------ random states
def rng_state() -> dict[str, Any]:
    """Every random state a training step touches, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(obj):
    return [_to_lists(o) for o in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj):
    return tuple(_to_tuples(o) for o in obj) if isinstance(obj, list) else obj
