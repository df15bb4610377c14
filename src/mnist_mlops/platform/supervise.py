"""`python -m mnist_mlops.platform.supervise PARENT_PID -- CMD...`: run CMD, and end CMD's
whole process group as soon as PARENT_PID is gone.

A helper server started in its own session survives its parent: Ctrl-C in a terminal
never reaches it, and a SIGKILLed parent cannot clean up. This supervisor leads the group,
checks twice a second that its parent is still its parent (an orphan is re-parented), and
then terminates the group: SIGTERM, and SIGKILL for whatever is still there after a grace
period. (Linux's PR_SET_PDEATHSIG would be quicker but fires when the parent *thread*
exits, and Prefect runs tasks in worker threads.)
A SIGTERM or SIGINT sent to the group (a normal stop) is passed on the same way.
Standard library only, so it starts in milliseconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

GRACE_SECONDS = 10.0  # after the supervisor's own SIGTERM, before SIGKILL
STOP_GRACE_SECONDS = 60.0  # a helper told to stop (Ctrl-C, SIGTERM to the group) shuts down in its own time


def _wait(child: subprocess.Popen, seconds: float) -> int | None:
    try:
        return child.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def _signal_group(sig: int) -> None:
    try:
        os.killpg(0, sig)
    except ProcessLookupError:
        pass


def _end_group(child: subprocess.Popen, signalled: bool) -> int:
    """End the helper and whatever it started; the supervisor exits last.

    `signalled`: the group was sent SIGTERM/SIGINT (a normal stop, `killpg`): the helper got
    it too and is given the grace period to shut down cleanly before it is terminated here.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rc = child.poll()
    if rc is None and signalled:
        rc = _wait(child, STOP_GRACE_SECONDS)
    if rc is None:
        _signal_group(signal.SIGTERM)
        rc = _wait(child, GRACE_SECONDS)
    if rc is None:
        _signal_group(signal.SIGKILL)  # ends the supervisor too
    _signal_group(signal.SIGTERM)  # grandchildren the helper left behind
    return rc


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m mnist_mlops.platform.supervise PARENT_PID -- CMD...", file=sys.stderr)
        return 2
    parent = int(argv[0])
    signalled = False

    def on_stop(signum, frame):  # the group was told to stop
        nonlocal signalled
        signalled = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    child = subprocess.Popen(argv[2:])
    while not signalled and os.getppid() == parent and _wait(child, 0.5) is None:
        pass
    return _end_group(child, signalled)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
