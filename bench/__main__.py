"""Entry point of ``python -m bench``."""

from bench.cli import main

# The guard matters: the limit's worker processes are spawned, and spawn
# re-imports the main module under another name.
if __name__ == "__main__":
    raise SystemExit(main())
