"""When the library may read a device tensor's values on the host.

Reading a value (``bool(t)``, ``t.item()``, ``t.tolist()``, a boolean-mask index, ``unique``)
makes the host wait for the accelerator. In a training step that stall is paid in full: the GPU
idles while the host, now behind, launches the next kernels one by one. On the CPU the same read
costs nothing.

So the training path (the LOOK loss, the memories) asks :func:`host_reads_are_free` before a check
that needs values: on the CPU it checks and raises a clear ``ValueError``; on an accelerator it
guards on the device instead (a non-finite query gives a NaN loss term, which the trainer's per-step
loss check reports; a non-finite memory row is never written) and leaves range checks of ids and
labels to the trainer, which does them on the host before the batch is moved.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DeferredChecks", "host_reads_are_free"]


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading values of tensors on ``device`` costs no host-device synchronisation."""
    return device.type in ("cpu", "meta")


Report = Callable[[list[int]], None]


class DeferredChecks:
    """Checks computed on the device whose results the host reads one call later.

    :meth:`push` starts copying a small integer tensor of counts to the host (into a pinned
    buffer, with an event, on CUDA). :meth:`settle` hands every check but the newest ``keep``
    ones to its ``report`` callback, which raises if a count says something was wrong. Called at
    the start of each update, before that update pushes its own check, it reports the previous
    update's: by then that copy has long arrived (the trainer synchronises once per step anyway),
    so the read costs no wait, and every DDP rank reports at the same call. Before a checkpoint
    is written it reports everything, so no error is hidden behind a save.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, torch.cuda.Event | None, Report]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, counts: torch.Tensor, report: Report) -> None:
        """Queue ``report(counts as a list of ints)`` for a later :meth:`settle`."""
        counts = counts.detach()
        if counts.device.type == "cuda":
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(counts.device))
            self._pending.append((host, event, report))
        else:
            # Nothing asynchronous to wait for: the CPU, or a device without CUDA events (where
            # this copy synchronises, as an immediate check would).
            self._pending.append((counts.to("cpu", copy=True), None, report))

    def settle(self, keep: int = 0) -> None:
        """Report every pending check except the newest ``keep``, oldest first."""
        while len(self._pending) > keep:
            host, event, report = self._pending.pop(0)
            if event is not None and not event.query():  # normally long done: no wait at all
                event.synchronize()
            # numpy(): a host tensor's values, read without going through the dispatcher.
            report([int(value) for value in host.numpy().reshape(-1)])
