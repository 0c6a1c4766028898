"""``python -m clipdex`` runs the CLI."""

import sys

from clipdex.cli import main

sys.exit(main())
