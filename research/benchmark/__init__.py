"""Is a learned policy worth reusing? Zero-shot transfer on the MemControl-Bench tables.

For each test task (leave-one-task-out over the training tasks; leave-one-source-out, each training
task against the training tasks of other sources only, as a new kind of data meets the tables; and
each held-out task, of a source no training task uses), each preference and each seed, every
method picks masks for the test task without having seen it; its regret is read off the table,
normalised per task and preference: 0 = the task's best mask, 1 = its worst. (Not 1 = the mask
of ones: on tasks where fine-tuning induces little memorization the mask of ones is the best mask
or close to it, and a regret scaled by it is undefined or explodes.)
Methods (every one zero-shot from the training tasks' rows and the test task's descriptor, or
searching the test task; judged at 1..4 or 1..16 fine-tunes):

* ``ppo`` (its 1..4 most probable masks) and ``ppo-no-descriptor``: the one-shot PPO policy;
* ``ppo-search`` and its ablations ``-no-descriptor`` / ``-no-history``: the search policy
  (``env.mode=search``), each fine-tune chosen after the results before it;
* ``nearest-task``, ``knn-tasks``, ``portfolio``, ``regression``, ``gradient-top-g``,
  ``single-best`` (by mean regret), ``single-best (mean reward)``, ``preset: ...``;
* ``random``, ``tpe``, ``gp``, ``tpe-warm`` (TPE with the nearest task's best masks first) and
  ``gp-prior`` (a GP whose prior mean is the calibrated regret of the training tasks weighted by
  descriptor distance, :meth:`memrl.prior.TransferPrior.weighted_sources`; no learning).

    python -m research.benchmark transfer --n-seeds 10   # --episodes (one-shot PPO), --search-episodes
    python -m research.benchmark tune --n-seeds 2      # --method ppo-search|ppo|regression, --nested
    python -m research.benchmark modes --n-seeds 3
    python -m research.benchmark claims
    python -m research.benchmark findings              # best masks per task, seed noise (no method runs)
    python -m research.benchmark ship                  # trains the shipped policy (memrl/assets/policy)
    python -m research.benchmark search --n-seeds 10 --budget 64

``transfer`` writes ``transfer.csv`` (one row per method, task, split, preference, seed and number
of fine-tunes), ``transfer.md`` (per split and preference: mean with a task-level 95% interval, IQM,
tail, worst, hits, paired difference to ``ppo``, gap closed; then mean regret by fine-tunes) and
``transfer.png``.
``tune`` chooses a method's learning rate and length (training episodes for the search policy,
where 0 is untrained and searches exactly as ``gp-prior``, and for one-shot PPO; boosting
iterations for the regression) by leaving one *training* task out, so no held-out task is looked
at (``tune-METHOD.csv``, ``tune-METHOD.md``); the chosen values go in ``configs/bench.yaml``'s
``ppo`` (the PPO policies) and ``research.benchmark.methods`` (the regression). The leave-one-out
split of ``transfer`` then scores methods tuned on its own test tasks (optimistic); ``--nested``
adds the honest figure: each left-out task's setting chosen on inner folds without it.
``modes`` compares mask mode with sequential mode (one group per step): the zero-shot regret of
each one's first proposal after the same numbers of training episodes (``modes.*``).
``claims`` checks the MemControl paper's findings at small scale (``claims.*``): full fine-tuning
memorizes more than the attention presets; memorization grows with duplication; searched masks
against the presets on the Pareto front.
``search`` is the other question: searching one task from scratch, best-so-far regret against
the number of distinct fine-tunes (1..64) for PPO, random search, TPE, NSGA-II and GP
(``search.csv``, ``search.md``, ``search.png``).

The package: :mod:`~research.benchmark.folds` (the tables as arrays, folds),
:mod:`~research.benchmark.methods` (what each method tries), :mod:`~research.benchmark.experiments`
(transfer, modes, search), :mod:`~research.benchmark.stats` (IQM, bootstrap, tables, plots),
:mod:`~research.benchmark.findings` (findings and the paper's claims), :mod:`~research.benchmark.ship`
(the shipped policy) and :mod:`~research.benchmark.cli` (the command).
"""

from memrl.reward import TERMS
from research.benchmark.cli import main
from research.benchmark.experiments import in_parallel, modes, search_curves, transfer
from research.benchmark.findings import claims, findings
from research.benchmark.folds import BUDGETS, PREFERENCES, BenchTable, folds, load_table, mask_index
from research.benchmark.ship import ship, transfer_numbers
from research.benchmark.stats import bootstrap, iqm, summarise, write_rows

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
