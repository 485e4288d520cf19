"""Is a learned policy worth reusing? Zero-shot transfer on the MemControl-Bench tables.

For each test task (leave-one-task-out over the training tasks, and each held-out task), each
preference and each seed, every method picks masks for the test task without having seen it; its
regret is read off the table, normalised per task and preference: 0 = the task's best mask, 1 = its
worst. (Not 1 = the mask of ones: on tasks where fine-tuning induces little memorization the mask
of ones is the best mask or close to it, and a regret scaled by it is undefined or explodes.)
Methods:

* ``ppo`` / ``ppo-topK``: a preference-conditioned PPO policy trained on the other tasks (replay):
  its first proposal (0 fine-tunes) and the best of its K most probable masks (K = 2..4 fine-tunes);
* ``ppo-no-descriptor``: the same PPO with the descriptor zeroed (if it matches ``ppo``, the
  descriptor carries no usable information);
* ``single-best``: the one mask with the best mean reward over the training tasks for the same
  preference (MemControl's way of reusing a mask); ``preset: ...``: the hand-picked masks (the
  attention of the down blocks, the mid block, the up blocks, and all attention = the mask of ones);
* ``regression``: a gradient-boosted regression from (descriptor, preference, mask) to reward
  trained on the same training rows, taking its argmax (as zero-shot HPO work does);
* ``random-N`` / ``tpe-N``: random search and Optuna TPE on the test task with N fine-tunes.

    python -m memrl.benchmark transfer --n-seeds 10   # PPO episodes: ppo.total_timesteps (--episodes)
    python -m memrl.benchmark modes --n-seeds 3
    python -m memrl.benchmark claims
    python -m memrl.benchmark findings              # best masks per task, seed noise (no method runs)
    python -m memrl.benchmark ship                  # trains the shipped policy (memrl/assets/policy)
    python -m memrl.benchmark search --n-seeds 10 --budget 64

``transfer`` writes ``transfer.csv`` (one row per method, task, preference, seed), ``transfer.md``
(interquartile mean regret with 95% bootstrap intervals, and the share of the gap between the
single best mask and the per-task optimum that each method closes) and ``transfer.png``.
``modes`` compares mask mode with sequential mode (one group per step): the zero-shot regret of
each one's first proposal after the same numbers of training episodes (``modes.*``).
``claims`` checks the MemControl paper's findings at small scale (``claims.*``): full fine-tuning
memorizes more than the attention presets; memorization grows with duplication; searched masks
against the presets on the Pareto front.
``search`` is the other question: searching one task from scratch, best-so-far regret against
the number of distinct fine-tunes (1..64) for PPO, random search, TPE, NSGA-II and GP
(``search.csv``, ``search.md``, ``search.png``).

The package: :mod:`~memrl.benchmark.table` (the tables as arrays, folds),
:mod:`~memrl.benchmark.methods` (what each method tries), :mod:`~memrl.benchmark.experiments`
(transfer, modes, search), :mod:`~memrl.benchmark.stats` (IQM, bootstrap, tables, plots),
:mod:`~memrl.benchmark.findings` (findings and the paper's claims), :mod:`~memrl.benchmark.ship`
(the shipped policy) and :mod:`~memrl.benchmark.cli` (the command).
"""

from memrl.benchmark.cli import main
from memrl.benchmark.experiments import in_parallel, modes, search_curves, transfer
from memrl.benchmark.findings import claims, findings
from memrl.benchmark.ship import ship, transfer_numbers
from memrl.benchmark.stats import bootstrap, iqm, summarise, write_rows
from memrl.benchmark.table import BUDGETS, PREFERENCES, TERMS, BenchTable, folds, load_table, mask_index

__all__ = [
    "BUDGETS",
    "PREFERENCES",
    "TERMS",
    "BenchTable",
    "bootstrap",
    "claims",
    "findings",
    "folds",
    "in_parallel",
    "iqm",
    "load_table",
    "main",
    "mask_index",
    "modes",
    "search_curves",
    "ship",
    "summarise",
    "transfer",
    "transfer_numbers",
    "write_rows",
]
