"""Issue 2's check, now one case of benchmarks/throughput.py: shelltrain's engine vs a plain hand-written loop,
DataLoader path, no augmentation (throughput.py's options still apply and win).

    python benchmarks/overhead.py [--model cnn] [--rounds 5] [--image-size 32]
"""

import sys

from throughput import main

if __name__ == "__main__":
    sys.argv[1:1] = ["--data-paths", "loader", "--augmentation", "none"]
    main()
