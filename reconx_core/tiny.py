"""Moved to `reconx_core.testing` (testing support). This alias keeps old imports working for one release."""

from .testing.tiny_models import TINY_BRANCH, TINY_DUST3R, TINY_VIDEO, tiny_dust3r, write_tiny_models  # noqa: F401
