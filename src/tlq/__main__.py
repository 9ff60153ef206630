"""``python -m tlq`` (what ``torchrun -m tlq`` runs)."""

import os
import sys

from tlq.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:  # a rank of a torchrun job: see exit_rank
    from tlq.engine.distributed import exit_rank

    exit_rank(code)
sys.exit(code)
