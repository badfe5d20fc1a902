"""``python -m proofs_check``: see :mod:`proofs_check`."""
import sys

from proofs_check import main

sys.exit(main())
