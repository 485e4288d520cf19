"""`digits-invert`, mask of ones: held-out loss, canary loss ratio and reward per checkpoint at
suite v3's fine-tune learning rate and at the probe's."""

import numpy as np

from memrl.config import load_config
from memrl.curves import load_curves

RUNS = (
    ("configs/bench3.yaml", ["env.table=/tmp/snap2.sqlite"]),
    ("bench/results/curves/probe-lr/config.yaml", ["env.table=/tmp/probe-lr-store.sqlite"]),
)
for path, overrides in RUNS:
    cfg = load_config(path, overrides)
    tab = load_curves(cfg, ("heldout_loss", "canary_log_loss_ratio"))
    t, m = tab.names.index("digits-invert"), tab.masks.index("1111111")
    print(path, "lr", cfg.finetune.lr, "refs", tab.references[t] is not None)
    print(" steps      ", " ".join(f"{s:6d}" for s in tab.steps[::2]))
    for name in ("heldout_loss", "canary_log_loss_ratio"):
        print(f" {name[:10]:11s}", " ".join(f"{v:6.4f}" for v in tab.values[name][t, m, 0, ::2]))
    for w in (0.25, 0.5, 0.75):
        r = tab.rewards(cfg.reward, t, w)[m, 0]
        print(f" reward w={w}", " ".join(f"{v:6.3f}" for v in r[::2]), " best at", tab.steps[np.nanargmax(r)])
