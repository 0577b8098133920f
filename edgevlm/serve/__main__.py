"""`python -m edgevlm.serve` (what `make serve` runs): see cli.py."""

import sys

from edgevlm.serve.cli import main

sys.exit(main())
