import sys

from decodekit.cli import main

sys.exit(main())
