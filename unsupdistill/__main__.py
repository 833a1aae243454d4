import sys

from unsupdistill.cli import main

sys.exit(main())
