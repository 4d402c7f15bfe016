"""``python -m sparsediff ...`` (also what ``torchrun -m sparsediff train ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
