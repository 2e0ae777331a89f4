"""Shared fixtures: each lives in a fixtures_*.py module and is imported here by name."""

import os

from hypothesis import settings

from fixtures_debian import apppot_deb, apppot_deb_next, installed_tree, prepared_tree, tree_copy  # noqa: F401
from fixtures_slurm import slurm_cluster  # noqa: F401
from fixtures_tree import assert_trees_equal, rootfs  # noqa: F401
from fixtures_uml import apppot_image, start_job, suite_image, uml_home, uml_jobdir, uml_kernel, uml_user  # noqa: F401

# CI must not depend on luck: there, hypothesis draws the same examples every run
# (a failure found locally is kept in .hypothesis/ and replayed first).
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
