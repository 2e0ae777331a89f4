"""Shared fixtures: each lives in a fixtures_*.py module and is imported here by name."""

from fixtures_tree import assert_trees_equal, rootfs  # noqa: F401
