"""Run `compiled-mask-guards` from a clone: python tools/inspect_guards.py --help"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
from compiled_mask.cli.guards import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
