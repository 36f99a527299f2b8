"""`python -m coalesce` is the `coalesce` command."""

import sys

from coalesce.cli import main

sys.exit(main())
