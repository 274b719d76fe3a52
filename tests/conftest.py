"""Suite-wide settings.

Under CI (the ``CI`` variable set, as ``.ci/run`` has it), Hypothesis runs derandomized:
the same examples every run, so a landing is never decided by the luck of one random
draw. Local runs stay random and keep exploring new examples.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
