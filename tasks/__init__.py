"""Training tasks that exercise fusedrnn end to end: ``python -m tasks.<name> --help``."""
