"""``python -m pipeline.cli``: the ``intraq-pipeline`` command."""

from pipeline.cli.app import main

main()
