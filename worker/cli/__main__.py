"""``python -m worker.cli``: the same as the ``pneumoscreen`` command."""

from worker.cli import main

main()
