"""`python -m virtbroker.launcher` is `virtbroker`."""
import sys

from virtbroker.launcher.cli import main

sys.exit(main())
