import sys

from bigtrain.resilience import catch_early_signals

catch_early_signals()  # before torch is imported: a preemption notice during start-up is kept, not fatal

from bigtrain.cli import main  # noqa: E402

sys.exit(main())
