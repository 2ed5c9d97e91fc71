"""``python -m revgrad``: the same as the ``revgrad`` command."""

from .tools.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
