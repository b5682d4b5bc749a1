import sys

from app.ops.cli.commands import main

sys.exit(main())
