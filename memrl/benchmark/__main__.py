import sys

from memrl.benchmark.cli import main

sys.exit(main())
