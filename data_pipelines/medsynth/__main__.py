"""`python -m data_pipelines.medsynth --out DIR [--seed N] [--size X] ...`: build the set."""

import sys

from data_pipelines.medsynth.builder import main

sys.exit(main())
