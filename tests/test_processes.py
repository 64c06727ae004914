"""processes: a child's user error, crash and Ctrl-C become its exit code and one message; stopping children."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fer_search.errors import UserError
from fer_search.processes import INTERRUPTED, USER_ERROR, ChildError, run_child, spawn_context, stop_processes


class Box(list[Any]):
    """A queue stand-in: what the child would send to its parent."""

    def put(self, item: Any) -> None:
        self.append(item)


def raising(error: BaseException) -> Any:
    def work() -> None:
        raise error

    return work


def test_a_user_error_is_sent_once_and_exits_2() -> None:
    box = Box()
    with pytest.raises(SystemExit) as ended:
        run_child("worker 1", box, raising(UserError("data.path: no such folder")))
    assert ended.value.code == USER_ERROR
    assert box == [ChildError("worker 1", "data.path: no such folder", user_error=True)]


def test_a_crash_is_sent_as_one_line_and_raised_for_its_traceback() -> None:
    box = Box()
    with pytest.raises(ValueError, match="a bug"):
        run_child("best seed 3", box, raising(ValueError("a bug\nsecond line")))
    assert box == [ChildError("best seed 3", "ValueError: a bug", user_error=False)]


def test_ctrl_c_exits_130_and_sends_nothing() -> None:
    box = Box()
    with pytest.raises(SystemExit) as ended:
        run_child("worker 0", box, raising(KeyboardInterrupt()))
    assert ended.value.code == INTERRUPTED and box == []


def test_work_that_ends_well_sends_nothing() -> None:
    box = Box()
    run_child("worker 0", box, lambda: None)
    assert box == []


def test_stop_processes_interrupts_those_still_running_after_the_grace() -> None:
    ctx = spawn_context()
    sleeper = ctx.Process(target=time.sleep, args=(60,))
    sleeper.start()
    drained: list[int] = []
    started = time.monotonic()
    stop_processes([sleeper], lambda: drained.append(1), grace_s=0.5)
    assert not sleeper.is_alive() and sleeper.exitcode != 0  # ended by the SIGINT, not by its sleep
    assert 0.5 <= time.monotonic() - started < 30 and drained
