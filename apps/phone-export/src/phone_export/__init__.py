"""phone-export: bundles of a built model for Android and iOS apps (see cli.py)."""
