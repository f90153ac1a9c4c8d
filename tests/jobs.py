"""Commands run as a scheduler runs a job: in their own process group, then signalled as one."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence


def terminate_job_when(
    command: Sequence[str],
    env: Mapping[str, str],
    ready: Callable[[], bool],
    *,
    wait: float = 120.0,
) -> tuple[int, str]:
    """Start ``command`` in a new process group, wait (at most ``wait`` s) until ``ready()``,
    then send SIGTERM to the whole group, DataLoader workers too, as a scheduler does.

    Returns the exit status and the combined output. Fails, with the output, if the command
    ended before it was ready (the signal would then test nothing).
    """
    job = subprocess.Popen(
        list(command), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + wait
    while time.time() < deadline and job.poll() is None and not ready():
        time.sleep(0.05)
    assert job.poll() is None, job.communicate()[0].decode()
    os.killpg(job.pid, signal.SIGTERM)
    output = job.communicate(timeout=120)[0].decode()
    return job.returncode, output
