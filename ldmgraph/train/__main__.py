"""``python -m ldmgraph.train train|evaluate ...``: the training commands without the main CLI."""

import sys

from .cli import main

sys.exit(main())
