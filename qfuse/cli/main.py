"""Placeholder: the CLI is being written."""


def main() -> int:
    return 0
