import sys

from kvmsplit.cli.main import main

sys.exit(main())
