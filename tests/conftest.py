import pytest

from tiny_checkpoints import save_tiny_policy_and_rm


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """tiny_checkpoints.save_tiny_policy_and_rm in a fresh directory, once per test module."""
    return save_tiny_policy_and_rm(tmp_path_factory.mktemp("ckpts"))


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """A stage's main installs SIGTERM/SIGUSR1 handlers that only set a flag (runtime.watch_preemption); put the
    previous ones back after each test, so a SIGTERM still stops pytest."""
    import signal
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in old.items():
        signal.signal(s, handler)
