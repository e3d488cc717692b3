"""``python -m grpo ...`` is the ``grpo`` command."""

import sys

from grpo.orchestration.cli import main

sys.exit(main())
