"""Command line: ``tuban`` (a click group; one module per concern)."""
