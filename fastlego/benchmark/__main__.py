"""`python -m fastlego.benchmark [options]`: the same as `fastlego bench [options]`."""

import sys

from .cli import main

sys.exit(main())
