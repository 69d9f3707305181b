"""``python -m pulsectl``."""

import sys

from pulsectl.cli import main

sys.exit(main())
