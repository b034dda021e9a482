"""``python -m imgserve``: the same as the ``imgserve`` command."""

import sys

from imgserve.cli import main

if __name__ == "__main__":  # forkserver re-imports __main__ as __mp_main__
    sys.exit(main())
