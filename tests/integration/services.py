"""Small helpers for processes the integration tests start themselves."""

from __future__ import annotations

import os
import signal
import subprocess

from flows.local_stack import free_port

__all__ = ["free_port", "stop_process_group"]


def stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process and its children (its session), SIGKILL if they linger."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)
