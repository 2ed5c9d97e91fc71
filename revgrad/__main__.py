"""``python -m revgrad``: the same as the ``revgrad`` command."""

from .cli import main

raise SystemExit(main())
