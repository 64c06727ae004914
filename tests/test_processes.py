"""processes: a child's user error, crash and Ctrl-C become its exit code and one message; stopping children."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fer_search import processes
from fer_search.errors import UserError
from fer_search.processes import (
    INTERRUPTED,
    TERMINATED,
    USER_ERROR,
    ChildError,
    Terminated,
    ended_interrupted,
    how_it_ended,
    interrupts_deferred,
    raise_if_interrupted,
    run_child,
    signals_deferred,
    signals_held,
    signals_interrupt,
    spawn_context,
    stop_on_interrupt,
    stop_processes,
    stopped_on_leaving_early,
)

TESTS = Path(__file__).resolve().parent


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


def started_sleeper(name: str = "sleeper") -> Any:
    """A child that sleeps a minute unless a signal ends it: one at work, as far as stopping goes."""
    child = spawn_context().Process(target=time.sleep, args=(60,), name=name)
    child.start()
    return child


def test_stop_processes_interrupts_those_still_running_after_the_grace() -> None:
    sleeper = started_sleeper()
    drained: list[int] = []
    started = time.monotonic()
    stop_processes([sleeper], lambda: drained.append(1), grace_s=0.5)
    assert not sleeper.is_alive() and sleeper.exitcode != 0  # ended by the SIGINT, not by its sleep
    assert 0.5 <= time.monotonic() - started < 30 and drained


def started_stuck(name: str) -> Any:
    """A child where no Ctrl-C or SIGTERM reaches it, as one hung in a driver call: started with both
    ignored, which it keeps (spawn execs a fresh Python, and exec keeps ignored signals ignored)."""
    with signals_held():
        return started_sleeper(name)


def test_a_child_that_does_not_stop_is_told_then_killed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Stuck, it would keep its command waiting for ever, at Ctrl-C and at Python's exit."""
    monkeypatch.setattr(processes, "TELL_AFTER_S", 0.2)
    stuck = started_stuck("worker 1")
    with caplog.at_level(logging.WARNING, logger="fer_search"):
        stop_processes([stuck], lambda: None, grace_s=0.0, kill_after_s=1.0)
    assert stuck.exitcode == -signal.SIGKILL
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "waiting for worker 1 to save and stop",
        "killing worker 1 (SIGKILL)",
    ]


def test_a_child_that_stops_in_time_is_neither_told_nor_killed(caplog: pytest.LogCaptureFixture) -> None:
    sleeper = started_sleeper("worker 0")
    with caplog.at_level(logging.WARNING, logger="fer_search"):
        stop_processes([sleeper], lambda: None, grace_s=0.0, sig=signal.SIGTERM)
    assert sleeper.exitcode == -signal.SIGTERM and caplog.records == []


@pytest.mark.parametrize(
    ("first", "further", "raised"),
    [
        (signal.SIGINT, signal.SIGINT, KeyboardInterrupt),
        (signal.SIGTERM, signal.SIGINT, Terminated),  # 143 stays 143
        (signal.SIGINT, signal.SIGTERM, Terminated),  # 143, as when either was a SIGTERM
    ],
)
def test_a_further_interrupt_while_waiting_kills_sooner_and_is_raised_once_all_have_ended(
    monkeypatch: pytest.MonkeyPatch, first: signal.Signals, further: signal.Signals, raised: type
) -> None:
    """Raised at once, it would leave the children to Python's exit, which waits for them without end.
    Sent inside Ctrl-C's 2 s grace, as a user pressing Ctrl-C twice does."""
    monkeypatch.setattr(processes, "FORCE_AFTER_S", 0.5)
    stuck = started_stuck("worker 0")
    started = time.monotonic()
    with signals_interrupt():
        with pytest.raises(KeyboardInterrupt) as stopped:  # the parent's first interrupt
            signal.raise_signal(first)
        threading.Timer(0.5, os.kill, (os.getpid(), further)).start()
        with pytest.raises(KeyboardInterrupt) as ended:
            stop_on_interrupt([stuck], lambda: None, stopped.value)
    assert type(ended.value) is raised
    assert stuck.exitcode == -signal.SIGKILL and time.monotonic() - started < 60  # not KILL_AFTER_S


def test_sigterm_raises_terminated_inside_and_the_former_handler_comes_back() -> None:
    former = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), signals_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # interrupted at once
    assert signal.getsignal(signal.SIGTERM) is former
    assert isinstance(Terminated(), KeyboardInterrupt)  # every Ctrl-C handler saves the work for SIGTERM too


def test_an_interrupt_inside_a_deferred_block_is_raised_once_the_block_ends() -> None:
    done: list[str] = []
    raised: BaseException | None = None
    with signals_interrupt():
        try:
            with interrupts_deferred():
                with interrupts_deferred():  # nested, as a storage method calling another
                    os.kill(os.getpid(), signal.SIGTERM)
                    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C after it: the exit code is still SIGTERM's
                    done.append("inner")
                done.append("outer")
        except KeyboardInterrupt as e:  # pytest would stop at a KeyboardInterrupt that got away
            raised = e
    assert done == ["inner", "outer"] and type(raised) is Terminated
    with signals_interrupt(), interrupts_deferred():
        pass  # raised once: nothing is left to raise


def swallowed_interrupt(sig: int) -> list[BaseException]:
    """Send `sig` to this process from a finalizer, where Python hands the interrupt its handler raises
    to sys.unraisablehook and goes on: an interrupt lost. Returns what the hook got."""
    lost: list[BaseException] = []

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), sig)  # which runs the handler before it returns

    former, sys.unraisablehook = sys.unraisablehook, lambda raised: lost.append(raised.exc_value)
    try:
        Finalized()  # dropped at once
    finally:
        sys.unraisablehook = former
    return lost


@pytest.mark.parametrize("sig, interrupt", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_an_interrupt_python_lost_is_raised_again_until_leaving(sig: int, interrupt: type) -> None:
    with signals_interrupt():
        raise_if_interrupted()  # nothing yet
        assert [type(e) for e in swallowed_interrupt(sig)] == [interrupt]  # raised, and lost
        for _ in range(2):  # every time the work goes on
            with pytest.raises(interrupt) as raised:
                raise_if_interrupted()
            assert type(raised.value) is interrupt
    raise_if_interrupted()  # forgotten on leaving


def test_sigterm_exits_143_and_sends_nothing() -> None:
    box = Box()
    with pytest.raises(SystemExit) as ended:
        run_child("worker 0", box, raising(Terminated()))
    assert ended.value.code == TERMINATED and box == []


def test_children_ended_by_a_signal_end_their_parent_the_same_way() -> None:
    assert isinstance(ended_interrupted([0, TERMINATED, INTERRUPTED]), Terminated)
    assert type(ended_interrupted([0, INTERRUPTED])) is KeyboardInterrupt
    assert ended_interrupted([0, 1, USER_ERROR]) is None


def test_a_sigterm_is_passed_on_at_once() -> None:
    """docker stop and Kubernetes signal the parent alone; its children must get the SIGTERM too."""
    sleeper = started_sleeper()
    started = time.monotonic()
    stop_on_interrupt([sleeper], lambda: None, Terminated())
    assert sleeper.exitcode == -signal.SIGTERM and time.monotonic() - started < 2  # no Ctrl-C grace


def test_leaving_early_stops_the_children_listed_by_then() -> None:
    """Python joins non-daemon children at exit: one left running would keep the failed command waiting."""
    sleepers = [spawn_context().Process(target=time.sleep, args=(60,)) for _ in range(2)]
    running: list[Any] = []
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="second start"), stopped_on_leaving_early(running, lambda: None):
        sleepers[0].start()
        running.append(sleepers[0])
        raise RuntimeError("second start")
    assert sleepers[0].exitcode == -signal.SIGINT and time.monotonic() - started < 30  # at once, as Ctrl-C
    assert sleepers[1].pid is None  # never started, never waited for


def waiting_child(marker: str) -> None:
    """A spawned child (imported from this module) that says it started, then waits to be stopped."""

    def work() -> None:
        Path(marker).write_text("started")
        try:
            time.sleep(120)
        except Terminated:
            Path(marker).write_text("terminated")
            raise

    run_child("child", Box(), work)


PARENT = """
import sys, time
from fer_search.processes import spawn_context
from test_processes import waiting_child
child = spawn_context().Process(target=waiting_child, args=(sys.argv[1],))
child.start()
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_a_child_stops_as_for_sigterm_when_its_parent_is_killed(tmp_path: Path, sig: signal.Signals) -> None:
    """Re-parented, it would go on taking trials nobody watches."""
    marker = tmp_path / "marker"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(marker)], cwd=TESTS, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        parent.send_signal(sig)
        parent.wait()
        deadline = time.monotonic() + 20
        while marker.read_text() != "terminated" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.read_text() == "terminated"
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_child_killed_by_a_signal_is_not_said_to_have_left_a_traceback() -> None:
    assert how_it_ended(-signal.SIGKILL) == "was killed by SIGKILL"  # the OOM killer's, say
    assert how_it_ended(1) == "crashed with exit code 1 (its traceback is above)"


def test_a_signal_deferred_arrives_on_leaving_not_inside() -> None:
    """Inside: torch's import, where an interrupt raised from C++-called Python aborts the process."""
    reached = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            # To this thread: pytest's process has other threads, which do not block it (the command's
            # process has none yet where it defers).
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            time.sleep(0.2)
            reached = True
    assert reached


def sleeping_child() -> None:
    """A spawned child (imported from this module) that waits to be stopped."""
    run_child("child", Box(), lambda: time.sleep(60))


def test_a_child_started_with_signals_deferred_takes_them_once_it_runs() -> None:
    """It inherits the blocked signals for its imports; run_child lets them in, or SIGTERM would never land."""
    with signals_deferred():
        child = spawn_context().Process(target=sleeping_child)
        child.start()
    time.sleep(3)  # past its imports, into run_child's work
    os.kill(child.pid, signal.SIGTERM)
    child.join(timeout=30)
    assert child.exitcode == TERMINATED
