import sys

from fastproxy.sim.cli import main

sys.exit(main())
