"""``python -m bayeskern.finetune``: the same as the ``bayeskern-finetune`` command."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
