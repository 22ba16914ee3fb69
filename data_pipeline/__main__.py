import sys

from data_pipeline.cli import main

sys.exit(main())
