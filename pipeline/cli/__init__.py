"""The command line: ``intraq-pipeline`` (typer), its console/log output and its one-line errors."""
