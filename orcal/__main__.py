import sys

from orcal.cli import main

sys.exit(main())
