"""AppPot guest side: snapshots, deltas and the boot hook of an AppPot image."""

__version__ = "1.0.0"
