"""How a command's processes end: signals, and the child processes of one command (search's local workers,
finalize's seed runs), how they report, are stopped, and stop themselves when their parent is gone."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

from fer_search.errors import UserError, configure_logging, first_line

USER_ERROR = 2  # exit codes as the CLI's
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
TERMINATED = 143  # 128 + SIGTERM
log = logging.getLogger("fer_search")
# A stopping child saves its work in a second or two; one storage call waits at most 2 min on a locked
# SQLite file (storage.SQLITE_BUSY_TIMEOUT_MS) or 1 min on a silent PostgreSQL server (tcp_user_timeout).
# Past this it is stuck (a hung driver call, say), and its command would wait for it without end.
KILL_AFTER_S = 300.0
FORCE_AFTER_S = 10.0  # after a further Ctrl-C: time enough for a child already saving to finish
TELL_AFTER_S = 5.0  # a wait longer than this is told, so that a quiet terminal does not look hung


class Terminated(KeyboardInterrupt):
    """SIGTERM (what timeout, systemd, Kubernetes and docker stop send), raised as Ctrl-C's KeyboardInterrupt
    is, so that every `except KeyboardInterrupt` saves the work in hand the same way; the exit code differs."""


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The exit code of a process an interrupt ended: 143 after SIGTERM, 130 after Ctrl-C."""
    return TERMINATED if isinstance(interrupt, Terminated) else INTERRUPTED


# The kind of interrupt a signal raised inside signals_interrupt: process-wide, as signal handlers are.
_raised: type[KeyboardInterrupt] | None = None
_deferring = 0  # how deep the main thread is in interrupts_deferred blocks
_deferred: type[KeyboardInterrupt] | None = None  # the interrupt such a block raises on leaving


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    global _raised, _deferred
    # Once a SIGTERM came, a later Ctrl-C raises Terminated too: the exit code says 143 whatever followed.
    _raised = Terminated if signum == signal.SIGTERM or _raised is Terminated else KeyboardInterrupt
    if signum == signal.SIGTERM:
        # Ignored from now on: a second SIGTERM (sent to the process group as well as to this process,
        # or forwarded by a parent) must not cut short the saving the first one started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if _deferring:
        _deferred = _raised
        return
    _deferred = None  # raised now: never again on leaving a block
    raise _raised


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """While inside, in the main thread, the interrupt of a Ctrl-C or SIGTERM (inside signals_interrupt) is
    raised on leaving, once the work inside has ended, not where it lands; elsewhere this does nothing.

    Why: for the storage's transactions (storage._SteadyRDBStorage). Raised inside SQLAlchemy, an interrupt
    rolled back the write in hand (a checkpoint's pointer, lost), or, after a SELECT whose statement was
    still open, left the connection open mid-transaction for as long as the exception was handled: it held
    SQLite's write lock, and the requeue of the interrupted trial and every other worker waited on it for
    the whole busy timeout. A signal that lands while the main thread waits for that lock is handled right
    as the wait ends: two workers whose parent was killed hung so in about one stop in twenty.
    """
    global _deferring, _deferred
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _deferred is not None:
            interrupt, _deferred = _deferred, None
            raise interrupt


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """While inside, Ctrl-C's SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated in the main
    thread (Python's default would end the process at SIGTERM, losing the running trial's requeue),
    and raise_if_interrupted raises them again."""
    global _raised
    former, _raised = _raised, None
    try:
        with _handling({signal.SIGINT: _raise_interrupt, signal.SIGTERM: _raise_interrupt}):
            yield
    finally:
        _raised = former


def raise_if_interrupted() -> None:
    """Raise again the interrupt a signal raised inside signals_interrupt, for work that goes on after it.

    Why: Python can lose the exception a signal handler raises. Raised inside Python code that C code
    calls and whose error it clears (a finalizer; a key's __hash__ in a lookup that ignores errors),
    it vanishes, and a process that got the one signal its parent sends (or that ignores SIGTERMs
    after the first) would train on, unwatched. Seen here: a finalize seed process training on after
    its SIGINT, once in some 300 signals sent mid-training, and two test failures of the suite.
    Training calls this every step, and a parent waiting for its children every poll.
    """
    if _raised is not None:
        raise _raised


def signals_held() -> AbstractContextManager[None]:
    """While inside, Ctrl-C and SIGTERM are ignored: for the few writes that save interrupted work."""
    return _handling({signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: signal.SIG_IGN})


# The signals that stop a command's work; held back where an interrupt could not unwind.
_STOPPING = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def signals_deferred() -> Iterator[None]:
    """While inside, Ctrl-C and SIGTERM wait (blocked, not lost); they arrive on leaving.

    Why: torch's import runs Python code called from C++, where the interrupt a signal handler raises
    cannot unwind: the process aborts ("terminate called ... KeyboardInterrupt", SIGABRT) instead of
    exiting 130 or 143. A child process inherits the blocked signals, so one started inside imports
    its modules with them blocked too, until run_child lets them in. Blocked in this thread: it holds
    for a process whose other threads start inside (threads inherit the mask), as the CLI's before
    its first import of torch and a fresh child.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    former = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPPING)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, former)


@contextmanager
def _handling(handlers: dict[signal.Signals, Any]) -> Iterator[None]:
    """These signal handlers while inside, the former ones again on leaving; unchanged outside the main
    thread, the only one that may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    former = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        yield
    finally:
        for sig, handler in former.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class ChildError:
    """A child's error, sent to the parent, which tells it once: `label: message`."""

    label: str
    message: str
    user_error: bool  # a UserError (the child exits USER_ERROR); else a crash (exit 1, its traceback on stderr)


def spawn_context() -> Any:
    """Processes, not threads: the GIL would serialise the Python between kernels. Spawn, not fork: CUDA-safe."""
    return multiprocessing.get_context("spawn")


def run_child(label: str, queue: Any, work: Callable[[], None], level: int = logging.INFO) -> None:
    """Run a child's `work`, logging at `level` (its parent's: see errors.log_level); its user error or crash
    goes to the parent's queue, and its exit code says which.

    SIGTERM and the parent's death (by any signal, SIGKILL included) stop it as Ctrl-C does.
    """
    configure_logging(level)
    try:
        with signals_interrupt():
            if hasattr(signal, "pthread_sigmask"):  # blocked by a parent that started it in signals_deferred
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPPING)
            _terminate_when_parent_dies(label)
            work()
    except UserError as e:
        queue.put(ChildError(label, str(e), user_error=True))
        sys.exit(USER_ERROR)
    except KeyboardInterrupt as e:
        sys.exit(exit_code(e))
    except Exception as e:
        queue.put(ChildError(label, f"{type(e).__name__}: {first_line(e)}", user_error=False))
        raise  # its traceback on stderr, exit 1


def _terminate_when_parent_dies(label: str) -> None:
    """A watcher thread that sends this process SIGTERM once its parent has ended.

    Why by hand: a child whose parent was killed is re-parented and would go on taking trials that
    nobody watches. multiprocessing gives the child a pipe from its parent (the parent's sentinel),
    which the kernel closes when the parent ends however it ends; Linux's PR_SET_PDEATHSIG would
    need ctypes and is not portable.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)  # first: the log line below may block on a pipe nobody reads now
        log.warning("%s: its parent process is gone; stopping as for SIGTERM", label)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def stop_processes(
    procs: list[Any],
    drain: Callable[[], None],
    grace_s: float,
    sig: int = signal.SIGINT,
    kill_after_s: float = KILL_AFTER_S,
) -> None:
    """`sig` (Ctrl-C's SIGINT, or SIGTERM) to the processes still running after `grace_s` seconds, SIGKILL to
    those still running `kill_after_s` seconds after that, then wait for all to end.

    `drain` empties their message queue meanwhile: a process blocked on a full pipe would never end. A
    further interrupt of this process meanwhile (Ctrl-C, or SIGTERM after a Ctrl-C: a second SIGTERM is
    ignored) brings the SIGKILL forward to FORCE_AFTER_S from then, and is raised once all have ended:
    raised at once, it would leave them to Python's exit, which waits for them without end.
    """
    with interrupts_deferred():
        _wait_for_killed(_killed_unless_ended(procs, drain, grace_s, sig, kill_after_s))


def _killed_unless_ended(
    procs: list[Any], drain: Callable[[], None], grace_s: float, sig: int, kill_after_s: float
) -> list[Any]:
    """Wait for `procs` to end, draining their queue: `sig` after `grace_s`, a warning TELL_AFTER_S after
    that, SIGKILL `kill_after_s` after the signal (sooner after a further interrupt); those killed."""
    signal_at = time.monotonic() + grace_s
    tell_at, kill_at = signal_at + TELL_AFTER_S, signal_at + kill_after_s
    signalled = told = forced = False
    while running := _running(procs):
        now = time.monotonic()
        if _deferred is not None and not forced:  # a further interrupt, deferred by stop_processes
            kill_at, forced = min(kill_at, now + FORCE_AFTER_S), True
        if not signalled and now >= signal_at:
            for p in running:
                os.kill(p.pid, sig)
            signalled = True
        elif signalled and now >= kill_at:
            log.warning(
                "killing %s (SIGKILL): as after kill -9, the work not saved is picked up later (a trial once "
                "its heartbeat is a grace period old)",
                _names(running),
            )
            for p in running:
                p.kill()
            return running
        elif signalled and not told and now >= tell_at:
            hint = "" if forced else f", {FORCE_AFTER_S:.0f} s after a Ctrl-C"
            log.warning(
                "waiting for %s to save and stop: killed (SIGKILL) in %.0f s if still running%s",
                _names(running),
                kill_at - now,
                hint,
            )
            told = True
        drain()
        time.sleep(0.05)
    return []


def _wait_for_killed(killed: list[Any]) -> None:
    """Wait a while for killed processes, without draining their queue (one killed mid-message left a
    part that a read would wait on for ever); one still there is stuck in the kernel, and told."""
    deadline = time.monotonic() + FORCE_AFTER_S
    for p in killed:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    if stuck := _running(killed):
        log.warning("%s did not end even at SIGKILL (stuck in the kernel); not waiting for it", _names(stuck))


def _running(procs: list[Any]) -> list[Any]:
    return [p for p in procs if p.is_alive()]


def _names(procs: list[Any]) -> str:
    return ", ".join(p.name for p in procs)


def stop_on_interrupt(procs: list[Any], drain: Callable[[], None], interrupt: KeyboardInterrupt) -> None:
    """Pass the interrupt that stopped this parent on to its children, then wait for all to end.

    SIGTERM at once (a child that got it too ignores a second); Ctrl-C's SIGINT to those still running
    after 2 s: from a terminal every child got the Ctrl-C too, and a second one would cut its requeue short.
    """
    if isinstance(interrupt, Terminated):
        stop_processes(procs, drain, 0.0, signal.SIGTERM)
    else:
        stop_processes(procs, drain, 2.0, signal.SIGINT)


@contextmanager
def stopped_on_leaving_early(running: Collection[Any], drain: Callable[[], None]) -> Iterator[None]:
    """Whatever ends the block early stops the child processes in `running` (a live collection: those
    started by then) before it goes on: an interrupt as stop_on_interrupt passes it on (for a signal
    sent to this process alone), anything else, a failed start included, with Ctrl-C's SIGINT at once,
    so that they requeue their work.

    Why: Python joins non-daemon children at exit, so one left running would keep a failed command
    waiting for it to finish all its work. List a child inside the signals_deferred block that starts
    it: an interrupt held back until the block's end then finds it listed.
    """
    try:
        yield
    except KeyboardInterrupt as e:
        stop_on_interrupt(list(running), drain, e)
        raise
    except BaseException:
        stop_processes(list(running), drain, 0.0)
        raise


def how_it_ended(code: int | None) -> str:
    """A child's exit code told for a parent's error line: a crash left its traceback, a signal did not."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        return f"was killed by {name}"
    return f"crashed with exit code {code} (its traceback is above)"


def ended_interrupted(codes: list[int | None]) -> KeyboardInterrupt | None:
    """The interrupt to raise in a parent whose children ended with these exit codes, if one was interrupted."""
    if TERMINATED in codes:
        return Terminated()
    if INTERRUPTED in codes:
        return KeyboardInterrupt()
    return None
