"""`python -m dapq.cli ...` is `dapq ...`."""

import sys

from . import main

sys.exit(main())
