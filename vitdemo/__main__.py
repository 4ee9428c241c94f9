"""`python -m vitdemo ...`: see vitdemo/cli/."""

import sys

from .cli import main

sys.exit(main())
