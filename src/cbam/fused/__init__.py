"""The fused path: CBAM's CPU kernels, the autograd function over them, the fused blocks and the ``fuse`` transform.

Importing this package (``import cbam`` does) registers the CPU kernel in CBAM's dispatch table
(``cbam.layers.dispatch``), so ``CBAM(256)`` in any network computes through the kernels on the CPU without further
calls; :func:`fuse` additionally folds what surrounds the module in the package's blocks (and in any block type given a
fused form with :func:`register_fusion`). Everything here computes the function the reference path computes, and is
tested against it.
"""

from ..layers.dispatch import register_kernel
from .blocks import FusedBlock, fuse, fused_types, register_fusion, unfuse
from .function import cpu_kernel, supported
from .native import native_status

register_kernel("cpu", cpu_kernel)

__all__ = ["FusedBlock", "fuse", "fused_types", "native_status", "register_fusion", "supported", "unfuse"]
