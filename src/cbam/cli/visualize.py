"""``cbam visualize``: pictures of what a trained CBAM network attends to (spatial gates per stage, Grad-CAM, channel
gates) and, with ``--score``, how often and how much that attention falls on the object. The work is
:func:`cbam.viz.visualize`'s; this module reads the flags and prints where the files went and the score table."""

from __future__ import annotations

import argparse

from ..train.data import DATASETS
from ..viz import visualize
from .options import at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The run(s) to show, the images (a folder or a data set), the output folder and the score."""
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="run of cbam train with CBAM modules: its folder, a .pt checkpoint or model.safetensors "
                             "(required)")
    parser.add_argument("--compare", default=None, metavar="PATH",
                        help="second run of the same data (e.g. the plain network) whose Grad-CAM is shown beside "
                             "(default: none)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", default=None, metavar="DIR",
                        help="folder of .png/.jpg/.jpeg/.bmp/.webp images to show, sorted by name; they have no "
                             "boxes, so no --score (default: none, a data set's images)")
    source.add_argument("--dataset", choices=DATASETS, default=None,
                        help="show the first validation images of this data set (default: the run's own)")
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help="folder holding the data set (default: the run's when the data set is its own)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for image_000.png, ..., channel_gates.png and score.json (required)")
    parser.add_argument("--num-images", type=at_least(1, 10000), default=8, metavar="N",
                        help="images to draw, one PNG each (default: %(default)s)")
    parser.add_argument("--score", action="store_true",
                        help="pointing game and mass in box of the attention maps against the data set's object "
                             "boxes, with chance (default: off)")
    parser.add_argument("--score-images", type=at_least(1, 1000000), default=256, metavar="N",
                        help="validation images the score is measured over (default: %(default)s)")
    parser.add_argument("--batch-size", type=at_least(1, 4096), default=32, metavar="N",
                        help="images per forward pass (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (default: a progress bar)")


def run(args: argparse.Namespace) -> int:
    """Draw (and score), then say where the files are."""
    result = visualize(args.checkpoint, output=args.output, compare=args.compare, images=args.images,
                       dataset=args.dataset, data_dir=args.data_dir, num_images=args.num_images, score=args.score,
                       score_images=args.score_images, batch_size=args.batch_size, progress=args.progress)
    count = len(result["pictures"])
    print(f"wrote {count} picture(s) (image_000.png, ...) and channel_gates.png to {result['output']}")
    if result["table"] is not None:
        print(f"\nscore over {result['score'][0]['images']} validation images (chance: the mean share of the image "
              f"inside the box):\n{result['table']}\n\nwritten to {result['score_json']}")
    return 0
