"""The reports of the benchmark runners in benchmarks/: one module per runner, holding what only that runner writes.

A runner (``benchmarks/<question>.py``) measures; its module here turns the results it stored into what a reader
sees: markdown tables, the summary it builds for them, targets met or not, and plots. Each module reads only the
results dict (or file) its runner wrote, so a report can be rebuilt from a saved ``results.json`` without running
anything again:

* ``quality``: quality.py's quality.md (scores, memory, forgetting, significance, learning-rate grids, targets)
  and quality_bleu.png;
* ``selection_value``: selection_value.py's summary (intervals over seeds, paired differences), selection_value.md,
  summary.json and selection_value_nll.png;
* ``speed``: speed.py's step-time and memory table, the inference table and the issue's targets.

Formatting rules every report shares (numbers, intervals, safe figure writing) are in ``common/report.py``.
Runners put benchmarks/ on ``sys.path`` and import ``reports.<runner>``.
"""
