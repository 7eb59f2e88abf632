import pytest

from tiny_checkpoints import save_tiny_policy_and_rm


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """tiny_checkpoints.save_tiny_policy_and_rm in a fresh directory, once per test module."""
    return save_tiny_policy_and_rm(tmp_path_factory.mktemp("ckpts"))
