"""``python -m pipeline`` is the ``tuban`` command."""

from .cli.main import main

main()
