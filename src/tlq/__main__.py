"""``python -m tlq`` (what ``torchrun -m tlq`` runs)."""

import sys

from tlq.cli import main

sys.exit(main())
