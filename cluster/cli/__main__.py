"""``python -m cluster.cli …``: how the supervisor starts node processes."""

import sys

from .main import main

sys.exit(main())
