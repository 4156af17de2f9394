"""Change detectors: pure array functions from an aligned image pair to change evidence."""
