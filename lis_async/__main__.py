"""``python -m lis_async``: the same as the ``lis-async`` command."""

import sys

from lis_async.cli import main

sys.exit(main())
