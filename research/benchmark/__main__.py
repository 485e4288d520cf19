import sys

from research.benchmark.cli import main

sys.exit(main())
