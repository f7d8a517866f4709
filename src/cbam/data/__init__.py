"""Data sets that ship with the package: real MNIST digits (embedded) and the cluttered canvases made from them."""

from .cluttered_digits import DIGIT_NAMES, ClutteredDigits, load_digits

__all__ = ["DIGIT_NAMES", "ClutteredDigits", "load_digits"]
