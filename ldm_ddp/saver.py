"""Saves that do not stall training. The state of a step is copied aside first: on the GPU when it has room
for a second copy beside the training step's peak (a device-to-device copy, milliseconds), into pinned host
buffers otherwise (the device-to-host copy is then the stall). A background thread moves a device copy to
the host, then runs the save's job (write, fsync, rename, retention, upload) while training goes on.

At most one save is in flight: `start` refuses while the one before has not been collected. The caller
collects each outcome with `poll` (non-blocking) or `wait`, in its own thread, so that every rank can agree on
it (run.py).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

MARGIN = 2 * 2**30  # device bytes left free beside the training peak and a device copy of the state


@dataclass
class Outcome:
    """One save, once it ended: the committed path, or the error that stopped it."""
    step: int
    path: Path | None = None
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: stall, to_host, job


class Saver:
    """Copies a training state aside and runs a save's job on it in the background (or inline)."""

    def __init__(self, snapshot: str = "auto", background: bool = True):
        """snapshot: auto | device | host (where the copy of the state is made on a GPU; see module doc)."""
        self.snapshot, self.background = snapshot, background
        self.where: str | None = None  # "device" or "host", decided at the first save on a GPU
        self._host: dict[str, torch.Tensor] = {}  # reused host buffers (pinned on a GPU machine), by name
        self._thread: threading.Thread | None = None
        self._outcome: Outcome | None = None
        self._stream = None
        self._preparing: threading.Thread | None = None
        self.step_in_flight = -1  # the step of the save started last

    def prepare(self, tensors: dict[str, torch.Tensor], wait: bool = False) -> None:
        """Allocate the pinned host buffers for a state shaped as `tensors` in a background thread, now: the
        first save would otherwise pay for pinning (about 2 GB/s; 20 s for an SDXL state, measured on an
        H200 host), which a preemption save cannot afford. Nothing to do for a state on the CPU."""
        if not any(t.device.type == "cuda" for t in tensors.values()):
            return
        shapes = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in tensors.items()}
        self._preparing = threading.Thread(target=self._host_buffers, args=(shapes, True),
                                           name="save-pin-buffers", daemon=True)
        self._preparing.start()
        if wait:
            self._preparing.join()

    # --- The copy aside -----------------------------------------------------------------------------------
    def _host_buffers(self, tensors: dict[str, torch.Tensor], pin: bool) -> dict[str, torch.Tensor]:
        """Contiguous host tensors shaped as `tensors`, allocated at the first save and reused (pinning
        gigabytes takes seconds)."""
        for name, t in tensors.items():
            buf = self._host.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                self._host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        for name in set(self._host) - set(tensors):
            del self._host[name]
        return {name: self._host[name] for name in tensors}

    def _decide(self, tensors: dict[str, torch.Tensor], device: torch.device) -> str:
        if self.snapshot != "auto":
            return self.snapshot
        need = sum(t.nbytes for t in tensors.values() if t.device.type == "cuda")
        total = torch.cuda.get_device_properties(device).total_memory
        return "device" if torch.cuda.max_memory_allocated(device) + need + MARGIN <= total else "host"

    def _capture(self, tensors: dict[str, torch.Tensor]):
        """-> (tensors the background reads, the event it waits for). Runs on the caller's thread."""
        names = list(tensors)
        src = [tensors[n].detach() for n in names]
        cuda = [t for t in src if t.device.type == "cuda"]
        if not cuda:
            dst = list(self._host_buffers(tensors, pin=False).values())
            torch._foreach_copy_(dst, src)
            return dict(zip(names, dst)), None
        if self.where is None:
            self.where = self._decide(tensors, cuda[0].device)
        if self.where == "device":  # stream-ordered after the step that made the state
            dst = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in src]
            torch._foreach_copy_(dst, src)
            event = torch.cuda.Event()
            event.record()
            return dict(zip(names, dst)), event
        dst = list(self._host_buffers(tensors, pin=True).values())
        torch._foreach_copy_(dst, src, non_blocking=True)
        torch.cuda.current_stream(cuda[0].device).synchronize()
        return dict(zip(names, dst)), None

    def _to_host(self, captured: dict[str, torch.Tensor], event) -> dict[str, torch.Tensor]:
        """Device copies -> the reused pinned buffers, on a side stream (background thread)."""
        if event is None:
            return captured
        device = next(iter(captured.values())).device
        self._stream = self._stream or torch.cuda.Stream(device)
        host = self._host_buffers(captured, pin=True)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(event)
            torch._foreach_copy_(list(host.values()), list(captured.values()), non_blocking=True)
        self._stream.synchronize()
        return host

    # --- The save in flight ---------------------------------------------------------------------------------
    def start(self, step: int, tensors: dict[str, torch.Tensor],
              job: Callable[[dict[str, torch.Tensor]], Path]) -> float:
        """Copy `tensors` aside and run `job(host tensors) -> committed path` on the copy, in the background
        when so configured. An earlier save must have been collected (poll/wait). -> the seconds the caller
        was held (the stall)."""
        if self._thread is not None or self._outcome is not None:
            raise RuntimeError("a save is still in flight or its outcome was not collected")
        t0 = time.perf_counter()
        self.step_in_flight = step
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None
        try:
            try:
                captured, event = self._capture(tensors)
            except torch.OutOfMemoryError:  # the device copy did not fit after all: pinned host memory
                if self.where != "device":
                    raise
                self.where = "host"
                captured, event = self._capture(tensors)
        except Exception as err:  # noqa: BLE001 -- a failed save, which every rank learns of (run.py)
            self._outcome = Outcome(step, error=err)
            return time.perf_counter() - t0
        stall = time.perf_counter() - t0

        def run() -> None:
            outcome = Outcome(step, timings={"stall": stall})
            try:
                t1 = time.perf_counter()
                host = self._to_host(captured, event)
                if host is not captured:  # device copies go back to the allocator once they are on the host
                    captured.clear()
                t2 = time.perf_counter()
                outcome.path = job(host)
                outcome.timings.update(to_host=t2 - t1, job=time.perf_counter() - t2)
            except BaseException as err:  # noqa: BLE001 -- handed to the caller's thread, which decides
                outcome.error = err
            self._outcome = outcome

        if self.background:
            self._thread = threading.Thread(target=run, name=f"save-step-{step}", daemon=False)
            self._thread.start()
        else:
            run()
        return stall

    def busy(self) -> bool:
        return self._thread is not None or self._outcome is not None

    def poll(self) -> Outcome | None:
        """The outcome of the save in flight if it has ended (once), else None; never blocks."""
        if self._thread is not None and self._thread.is_alive():
            return None
        return self.wait()

    def wait(self) -> Outcome | None:
        """Block until the save in flight ends; -> its outcome (once), or None when there was none."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        outcome, self._outcome = self._outcome, None
        return outcome
