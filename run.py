#!/usr/bin/env python
"""amrsd_jax command line: ``python run.py {generate,bench} --help``."""

import sys

from amrsd_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
