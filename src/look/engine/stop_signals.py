"""Stopping a run cleanly on a signal: what a cluster sends before it takes the machine back.

SLURM sends SIGTERM (or, with ``--signal=USR1@120``, SIGUSR1 some time ahead) to every process of
a job that is preempted or reaches its time limit, then SIGKILL after a grace period (KillWait,
30 s by default); torchrun passes its own SIGTERM on to its workers the same way. Killed at once,
a run loses every step since its last checkpoint. With the handlers of :class:`StopSignals` the
first such signal only asks the training loop to stop: it finishes the step in progress, saves a
checkpoint there and raises :class:`TrainingStopped`, and running the same command again resumes
from that step. Later signals change nothing: a worker of a SLURM job under torchrun receives
SIGTERM twice, from SLURM and from torchrun passing its own on, within milliseconds, and must not
die of the second. (Nor could a second signal free a step stuck in a collective: Python runs a
handler only between bytecodes. SIGKILL, which schedulers and torchrun send after their grace
period, and ``train.ddp_timeout_s`` end such a step.)

Under DDP the ranks may receive the signal at different steps (or only one rank may receive it):
the request rides in the all-reduce every step already has (``Trainer._forward_backward``), so
every rank stops after the same step and the checkpoint is whole.
"""

from __future__ import annotations

import atexit
import functools
import os
import signal
import threading
import types
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is not imported for a type: the config and the CLI import this module
    from torch.utils.data import DataLoader

# Signals a process may catch; SIGKILL and SIGSTOP cannot be, SIGINT is Ctrl-C (KeyboardInterrupt,
# which the command line already turns into "interrupted; the last checkpoint is kept").
STOPPABLE_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")
# What pre-training (train.stop_signals) and `look evaluate`'s fine-tuning stop on by default.
DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1")

# The exit status of a run stopped by a signal after saving its checkpoint: EX_TEMPFAIL, "try
# again later", which a job script can tell apart from a failure (e.g. to requeue the job).
EXIT_STOPPED = 75


class RunStopped(Exception):
    """A command stopped early on stop signal ``signal_name``, with what it had finished kept:
    running the same command again goes on (the command line exits with :data:`EXIT_STOPPED`)."""

    def __init__(self, signal_name: str, message: str) -> None:
        self.signal_name = signal_name
        super().__init__(message)


class TrainingStopped(RunStopped):
    """Training stopped early on a signal, after saving a checkpoint at ``global_step``; running
    the same command again resumes from it."""

    def __init__(
        self, signal_name: str, global_step: int, total_steps: int, checkpoint_dir: str
    ) -> None:
        self.global_step = global_step
        self.total_steps = total_steps
        self.checkpoint_dir = checkpoint_dir
        super().__init__(
            signal_name,
            f"stopped on {signal_name} at step {global_step} of {total_steps}; the checkpoint "
            f"of step {global_step} is in {checkpoint_dir}; run the same command to resume",
        )


class EvaluationStopped(RunStopped):
    """``look evaluate`` stopped on a signal between two batches of a feature extraction or
    before a protocol (``during`` says which). Nothing is lost that a re-run cannot reuse: the
    finished protocols are in ``results.json`` (marked incomplete), the finished feature sets in
    the cache."""

    def __init__(self, signal_name: str, during: str) -> None:
        self.during = during
        super().__init__(
            signal_name,
            f"stopped on {signal_name} during {during}; the finished protocols are in "
            "results.json and the finished feature sets in the feature cache; run the same "
            "command to go on",
        )


def signal_numbers(names: Iterable[str]) -> tuple[int, ...]:
    """The numbers of signal ``names`` (e.g. ``"SIGTERM"``), checked: a ValueError names any
    that cannot stop a run. Signals this platform lacks (SIGUSR1 on Windows) are left out, so
    that the default configuration loads everywhere."""
    numbers = []
    for name in names:
        if name not in STOPPABLE_SIGNALS:
            raise ValueError(
                f"{name!r} is not a signal a run can stop on; choose from {list(STOPPABLE_SIGNALS)}"
            )
        number = getattr(signal, name, None)
        if number is not None:
            numbers.append(int(number))
    return tuple(numbers)


def _leave_on_the_parents_sigterm(parent: int) -> None:
    """A worker's thread: wait for SIGTERM (blocked in every thread of the worker) and leave
    when the parent process sent it; a SIGTERM from anyone else (a job scheduler) is dropped."""
    while True:
        received = signal.sigwaitinfo({signal.SIGTERM})
        if received.si_pid == parent:
            os._exit(0)  # what torch's own worker does on its parent's SIGTERM


def ignore_signals(numbers: Sequence[int], worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: workers leave the stop signals to the main process. A job
    scheduler signals every process of the job, and a worker killed by SIGTERM would fail the
    main process's next batch ("DataLoader worker exited unexpectedly") before it can save. A
    worker whose main process is gone still exits: the loader's workers watch their parent.

    SIGTERM from the worker's own parent still ends it: that is how the loader ends a worker that
    does not leave when asked, and how multiprocessing ends its children when the main process
    exits (a worker ignoring it kept a run that failed on an error from ever exiting). Python's
    handlers cannot see a signal's sender, so SIGTERM stays blocked and a thread of the worker
    takes it with ``sigwaitinfo``, which can (where it exists: Linux; elsewhere it is ignored
    like the others, and :func:`end_workers` and an exit hook kill workers left over).

    The workers start with the signals blocked (:func:`start_workers`), since torch's worker
    sets its own SIGTERM handler (death for any SIGTERM) before this function runs; one arriving
    in between stays pending: dropped once ignored and unblocked, or taken by the thread."""
    del worker_id
    sender_aware = signal.SIGTERM in numbers and hasattr(signal, "sigwaitinfo")
    others = [number for number in numbers if not (sender_aware and number == signal.SIGTERM)]
    for number in others:
        signal.signal(number, signal.SIG_IGN)
    if sender_aware:
        threading.Thread(
            target=_leave_on_the_parents_sigterm, args=(os.getppid(),), daemon=True
        ).start()
    if others and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, others)


# Iterators of loaders started by start_workers. Where a worker cannot tell its parent's SIGTERM
# from a scheduler's (no sigwaitinfo) it ignores both, and multiprocessing, which ends a
# process's children at exit with SIGTERM and then waits for them, would wait forever:
# _end_workers_left_at_exit ends them first.
_BATCHES_IGNORING_SIGNALS: weakref.WeakSet[Any] = weakref.WeakSet()
_EXIT_HOOK_REGISTERED = False


def _end_workers_left_at_exit() -> None:
    for batches in list(_BATCHES_IGNORING_SIGNALS):
        end_workers(batches)


def _watch_for_exit(batches: Iterator[Any]) -> Iterator[Any]:
    """Remember ``batches`` for :func:`_end_workers_left_at_exit`."""
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        # Registered now, after the loader has imported multiprocessing (whose own exit
        # function was registered at its import): exit functions run last-registered first.
        atexit.register(_end_workers_left_at_exit)
        _EXIT_HOOK_REGISTERED = True
    _BATCHES_IGNORING_SIGNALS.add(batches)
    return batches


def start_workers(loader: DataLoader, numbers: Sequence[int]) -> Iterator[Any]:
    """``iter(loader)``, whose workers leave signals ``numbers`` to this process: each ignores
    them from its ``worker_init_fn`` (:func:`ignore_signals`, set here: the loader must have none
    of its own), and they are blocked while the workers start, which the workers inherit until
    that function unblocks them. In this process a signal that arrives meanwhile is delayed, not
    lost. The workers still end on SIGTERM from this process (see :func:`ignore_signals`), and
    an exit hook ends any left where they cannot tell it from a scheduler's."""
    if not numbers or loader.num_workers == 0:
        return iter(loader)
    if getattr(loader.worker_init_fn, "func", loader.worker_init_fn) not in (None, ignore_signals):
        raise ValueError("start_workers sets the loader's worker_init_fn; it has one of its own")
    loader.worker_init_fn = functools.partial(ignore_signals, tuple(numbers))
    if not hasattr(signal, "pthread_sigmask"):
        return _watch_for_exit(iter(loader))
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, numbers)
    try:
        return _watch_for_exit(iter(loader))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def end_workers(batches: Iterator[Any] | None) -> None:
    """Shut the workers of a loader's iterator (from :func:`start_workers`) down now, killing any
    that does not leave: a worker stuck in a slow read, where it ignores every SIGTERM (the
    loader's own fallback), would keep the interpreter's exit waiting past the scheduler's grace
    period, losing exit status 75 to its SIGKILL."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's; absent without workers
    if shutdown is None:
        return
    shutdown()  # asks the workers to leave, waits a few seconds, stops watching them
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join()


def ignore_stop_signals_until_exit() -> None:
    """Ignore every stoppable signal from now on: for a command that has saved its checkpoint
    on a stop signal and is about to exit with :data:`EXIT_STOPPED`. Under torchrun a rank that
    exits first makes torchrun send SIGTERM to the others, which may still be leaving (their
    handlers already restored): death by that signal would replace their status 75. SIGKILL,
    which torchrun and schedulers send last, still ends the process."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number in signal_numbers(STOPPABLE_SIGNALS):
        signal.signal(number, signal.SIG_IGN)


class StopSignals:
    """A context that catches ``names`` (signal names) and records the first one received in
    :attr:`received`; the previous handlers come back on exit. Outside the main thread, where
    Python cannot install handlers, it warns and catches nothing."""

    def __init__(self, names: Sequence[str]) -> None:
        self.numbers = signal_numbers(names)
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, number: int, frame: types.FrameType | None) -> None:
        del frame
        if (
            self.received is None
        ):  # later ones (the same signal passed on by torchrun) change nothing
            self.received = signal.Signals(number).name

    def __enter__(self) -> StopSignals:
        if not self.numbers:
            return self
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                f"stop signals {[signal.Signals(n).name for n in self.numbers]} are not "
                "caught: this runs outside the main "
                "thread, where Python cannot install signal handlers",
                RuntimeWarning,
                stacklevel=2,
            )
            return self
        for number in self.numbers:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous or signal.SIG_DFL)
        self._previous.clear()
