"""``python -m alignkit.estimate ...``, as ``alignkit estimate ...``."""

import sys

from alignkit.estimate.command import estimate_main

sys.exit(estimate_main(sys.argv[1:]))
