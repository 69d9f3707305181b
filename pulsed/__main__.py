import sys

from pulsed.cli import main

sys.exit(main())
