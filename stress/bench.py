"""``python stress/bench.py [...]``: the same as ``mpkv bench [...]``, from a checkout."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpkv import bench

if __name__ == "__main__":
    sys.exit(bench.main(sys.argv[1:]))
