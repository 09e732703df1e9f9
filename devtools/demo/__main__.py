"""``python -m devtools.demo`` (``make demo``)."""

import sys

from devtools.demo.run import main

if __name__ == "__main__":
    sys.exit(main())
