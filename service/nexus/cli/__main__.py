"""``python -m nexus.cli``: the nexus command, as the tests and the bench start it."""

import sys

from nexus.cli import main

sys.exit(main())
