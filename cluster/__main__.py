"""python -m cluster up|add-node|status|kill-node|down  (see cluster/local.py)."""

import sys

from cluster.local import main

sys.exit(main())
