"""Set-up and measurement shared by the benchmark runners in benchmarks/, one concept per module.

A runner (``benchmarks/<question>.py``) holds its question: command line and main loop, with its report in
``benchmarks/reports/`` where it is long. What it builds on lives here, so each piece is written once and read in
one place:

* ``machine``: the machine record stored with every result, and peak memory of a training run;
* ``timing``: timed steps and peak memory of one step, for the step-time benchmarks (speed, speed_vlm);
* ``preset``: the configuration record of a translation run, and the named presets of quality.py and
  selection_value.py;
* ``data``: the parallel pairs of every split (Bible verses or tiny fake pairs), their export and re-reading;
* ``models``: base model and tokenizer loading, and the config pieces every method builder uses;
* ``method_names``: quality.py's method names (the table presets list methods from);
* ``methods``: quality.py's methods (zero-shot, full, LoRA/DoRA, NeuronSelect and its ablations), built on a copy;
* ``matched``: selection_value.py's methods, every one at the trainable-weight budget of a Taylor selection;
* ``training``: the training batches and the training run every translation method goes through, and
  selection_value.py's learning-rate search;
* ``scoring``: a model's scores on held-out pairs (BLEU/chrF from greedy decoding, teacher-forced NLL);
* ``stats``: bootstrap intervals and paired differences, t intervals over seeds;
* ``report``: number formatting and figure saving for the markdown reports and plots.

Runners put benchmarks/ on ``sys.path`` and import ``common.<module>``. Importing this package also makes
``neuron_peft`` importable from a checkout that was not installed, and registers its PEFT method.
"""

from __future__ import annotations

import os
import sys

try:
    import neuron_peft  # noqa: F401  (registers the PEFT method)
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import neuron_peft  # noqa: F401
