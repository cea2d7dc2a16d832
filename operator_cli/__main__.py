"""``python -m operator_cli`` (or ``./dev cli``): the operator CLI."""

import sys

from operator_cli.cli import main

sys.exit(main())
