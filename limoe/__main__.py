import sys

from limoe.cli import main

sys.exit(main())
