"""``python stress/stress.py [...]``: the same as ``mpkv stress [...]``, from a checkout."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpkv import stress

if __name__ == "__main__":
    sys.exit(stress.main(sys.argv[1:]))
