"""What several test modules share that is not a fixture."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a server the test started in its own session (`start_new_session=True`): SIGTERM to its whole
    process group, SIGKILL after 15 s, then SIGKILL to whatever of the group outlived its leader."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    try:  # children (workers, kernels) that outlived the group's leader
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
