import sys

from seesay.cli import main

sys.exit(main())
