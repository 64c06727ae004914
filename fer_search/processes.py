"""Child processes of one command (search's local workers, finalize's seed runs): how they end and are stopped."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fer_search.errors import UserError, configure_logging, first_line

USER_ERROR = 2  # exit codes as the CLI's
INTERRUPTED = 130


@dataclass(frozen=True)
class ChildError:
    """A child's error, sent to the parent, which tells it once: `label: message`."""

    label: str
    message: str
    user_error: bool  # a UserError (the child exits USER_ERROR); else a crash (exit 1, its traceback on stderr)


def spawn_context() -> Any:
    """Processes, not threads: the GIL would serialise the Python between kernels. Spawn, not fork: CUDA-safe."""
    return multiprocessing.get_context("spawn")


def run_child(label: str, queue: Any, work: Callable[[], None]) -> None:
    """Run a child's `work`; its user error or crash goes to the parent's queue, and its exit code says which."""
    configure_logging()
    try:
        work()
    except UserError as e:
        queue.put(ChildError(label, str(e), user_error=True))
        sys.exit(USER_ERROR)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    except Exception as e:
        queue.put(ChildError(label, f"{type(e).__name__}: {first_line(e)}", user_error=False))
        raise  # its traceback on stderr, exit 1


def stop_processes(procs: list[Any], drain: Callable[[], None], grace_s: float) -> None:
    """SIGINT (a Ctrl-C) to the processes still running after `grace_s` seconds, then wait for all to end.

    `drain` empties their message queue meanwhile: a process blocked on a full pipe would never end.
    """
    deadline = time.monotonic() + grace_s
    signalled = False
    while any(p.is_alive() for p in procs):
        drain()
        if not signalled and time.monotonic() >= deadline:
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGINT)
            signalled = True
        time.sleep(0.05)
    for p in procs:
        p.join()
