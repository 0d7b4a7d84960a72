"""`python -m bench` (make bench): every benchmark suite in turn."""

import sys

from bench import replica

sys.exit(replica.main(sys.argv[1:] or ["all"]))
