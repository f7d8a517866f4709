"""Looking at what CBAM attends to: :func:`record` captures every CBAM module's gates during a forward pass."""

from .recorder import Recording, record

__all__ = ["Recording", "record"]
