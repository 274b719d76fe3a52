#!/usr/bin/env python3
"""Write the metrics reference table of ``docs/metrics.md`` from the catalogue.

The table sits between the two ``<!-- catalogue -->`` markers; the text around it is
hand-written. ``tests/telemetry/test_catalogue.py`` fails when the table and
``kvbroker/telemetry/catalogue.py`` disagree.

Usage::

    python scripts/gen_metrics_doc.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvbroker.telemetry.catalogue import reference_table  # noqa: E402

DOC = ROOT / "docs" / "metrics.md"
MARKERS = re.compile(r"(<!-- catalogue -->\n).*?(<!-- /catalogue -->)", re.S)


def main() -> int:
    text = DOC.read_text()
    new = MARKERS.sub(lambda m: m.group(1) + reference_table() + m.group(2), text)
    if new != text:
        DOC.write_text(new)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
