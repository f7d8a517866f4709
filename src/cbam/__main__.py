"""``python -m cbam`` (and ``torchrun -m cbam train ...``) runs the command line."""

from .cli import main

raise SystemExit(main())
