"""`python -m launcher` is `virtbroker`."""
import sys

from launcher.cli import main

sys.exit(main())
