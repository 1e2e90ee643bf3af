"""``python -m kdcore``: the command line (the same as the ``kdcore`` script)."""

import sys

from kdcore.cli import main

sys.exit(main())
