"""`python -m twofold` runs the `twofold` command."""

import sys

from twofold.cli import main

sys.exit(main())
