"""Run `compiled-mask-show` from a clone: python tools/show_mask.py --help"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled
from compiled_mask.cli.show import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
