"""Shared fixtures: the real programs on loopback, started as an operator starts them."""

from __future__ import annotations

import pytest

from cy_sidecar.localrun import Stack


@pytest.fixture
def stack(tmp_path):
    """A usage sink, a fast demo worker and a sidecar with two proxy processes."""
    st = Stack.create(root=str(tmp_path), log_path=str(tmp_path / "stack.log"))
    st.write_config()
    try:
        st.start_sink()
        st.start_worker("--tokens-per-sec", "400", "--ttft-ms", "5")
        yield st
    finally:
        st.stop()


@pytest.fixture
def running(stack):
    stack.start_sidecar(procs=2)
    return stack
