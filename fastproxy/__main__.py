import sys

from fastproxy.cli import main

sys.exit(main())
