import sys

from rayq.cli import main

sys.exit(main())
