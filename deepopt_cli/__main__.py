import sys

from deepopt_cli import main

sys.exit(main())
