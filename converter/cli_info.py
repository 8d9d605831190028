"""CLI commands (in progress)."""
COMMANDS: list = []
