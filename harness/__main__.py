"""``python -m harness`` is the ``harness`` command."""

from __future__ import annotations

import sys

if __name__ == "__main__":
    try:
        from harness.cli import main
    except KeyboardInterrupt:  # Ctrl-C while Python is still starting: no traceback
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(main())
