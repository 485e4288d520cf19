"""The research harness's benchmark: is a search method worth reusing? See
:mod:`research.benchmark.cli` (``python -m research.benchmark --help``) for the commands."""

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
