"""memrl's research harness: the benchmark of search methods on the suite's tables
(``python -m research.benchmark``). It imports memrl; memrl never imports it, and it is not part
of the installed package (run it from a checkout)."""
