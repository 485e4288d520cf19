"""Each complete task's best recipe per preference and the lengths within 0.05 regret of it."""

import collections
import sys

import numpy as np

from memrl.config import load_config
from memrl.curves import FULL, load_curves
from research.benchmark.recipes import recipe_regret

table_path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/snap2.sqlite"
cfg = load_config("bench3", [f"env.table={table_path}"])
tab = load_curves(cfg)
groups = [i for i, m in enumerate(tab.masks) if m != FULL]
counts: collections.Counter = collections.Counter()
for t in np.flatnonzero(tab.complete()):
    row = []
    for w in (0.25, 0.5, 0.75):
        r = recipe_regret(tab, cfg.reward, int(t), w)[groups]
        m, k = np.unravel_index(np.nanargmin(r), r.shape)
        counts[int(tab.steps[k])] += 1
        near = sorted({int(tab.steps[kk]) for kk in np.nonzero(r <= 0.05)[1]})
        row.append(f"{tab.masks[groups[m]]}@{tab.steps[k]} near:{near[:3]}..{near[-1]}")
    print(f"{tab.names[t]:28s}{'H' if tab.heldout[t] else 'T'}", " | ".join(row))
print(sorted(counts.items()))
