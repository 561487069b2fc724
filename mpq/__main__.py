"""``python -m mpq``: the ``mpq`` command, for environments without the entry-point script."""
from mpq.cli.main import main

main()
