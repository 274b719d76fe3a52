"""``python -m kvbroker``: the same as the ``kvbroker`` command."""

import sys

from kvbroker.cli import main

sys.exit(main())
