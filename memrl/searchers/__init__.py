"""Search methods behind one protocol: a searcher asks for trials and is told results; an oracle
(a live or replayed :class:`~memrl.task.Task`, or a table row) evaluates them.

    from memrl.searchers import Knowledge, TaskOracle, make_searcher, run
    history = run(make_searcher("tpe", Knowledge(k, preference, budget=8)), TaskOracle(task), 8)

Every method is registered once (:data:`SEARCHERS`) and runs live and on tables alike.
"""

from memrl.searchers.base import History, Knowledge, Oracle, Result, Searcher, Trial, run
from memrl.searchers.oracles import CurveOracle, TableOracle, TaskOracle
from memrl.searchers.policy import SearchPolicySearcher
from memrl.searchers.registry import ALIASES, SEARCHERS, make_searcher, names, spec_of

__all__ = [
    "CurveOracle",
    "ALIASES",
    "SEARCHERS",
    "History",
    "Knowledge",
    "Oracle",
    "Result",
    "SearchPolicySearcher",
    "Searcher",
    "TableOracle",
    "TaskOracle",
    "Trial",
    "make_searcher",
    "names",
    "run",
    "spec_of",
]
