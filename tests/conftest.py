"""Shared fixtures: each lives in a fixtures_*.py module and is imported here by name."""

from fixtures_tree import assert_trees_equal, rootfs  # noqa: F401
from fixtures_debian import apppot_deb, apppot_deb_next, installed_tree, prepared_tree, tree_copy  # noqa: F401
from fixtures_uml import apppot_image, start_job, uml_home, uml_jobdir, uml_user  # noqa: F401
