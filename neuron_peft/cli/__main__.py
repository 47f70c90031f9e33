"""``python -m neuron_peft.cli``: the same as the `neuron-peft` command."""

from . import main

raise SystemExit(main())
