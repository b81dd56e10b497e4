import sys

from agsearch.cli import main

sys.exit(main())
