import sys

from tiengine.cli import main

sys.exit(main())
