"""`python -m keepwarm` is the `keepwarm` command."""

import sys

from keepwarm.cli import main

sys.exit(main())
