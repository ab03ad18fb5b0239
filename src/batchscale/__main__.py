"""``python -m batchscale`` (and ``torchrun -m batchscale train ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
