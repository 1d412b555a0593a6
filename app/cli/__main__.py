"""`python -m app.cli` = `imgsim`."""

import sys

from app.cli import main

sys.exit(main())
