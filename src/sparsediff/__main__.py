"""``python -m sparsediff ...`` (also what ``torchrun -m sparsediff train ...`` runs)."""

import sys

from .commands import main

sys.exit(main())
