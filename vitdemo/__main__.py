"""`python -m vitdemo ...`: see vitdemo/cli.py."""

import sys

from .cli import main

sys.exit(main())
