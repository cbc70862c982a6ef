"""`python -m loadtest` is `kvrelay bench`."""

import sys

from loadtest.cli import main

sys.exit(main())
