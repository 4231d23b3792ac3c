"""Run the benchmarks: `python bench/run.py [--quick] [--json out.json] [--only NAME]`.

See bench/README.md for what is measured and how.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script from anywhere: `bench`, `tests.fixtures` and this checkout's proxy
# must import (the worker process re-imports this file, so this runs there too).
_REPO = Path(__file__).resolve().parents[1]
for _entry in (str(_REPO / "proxy"), str(_REPO)):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)

from bench.main import main  # noqa: E402 - needs the path set up above

if __name__ == "__main__":
    sys.exit(main())
