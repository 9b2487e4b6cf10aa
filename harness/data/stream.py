"""Batches of uint8 images for the training loop and the feature extraction, resident or streamed.

A dataset that fits in its share of the device memory is moved there once and a batch is
``images[index]`` on the device, as before. A larger one stays in host memory (usually a memory
map of a prepared shard) and is *streamed*: a background thread gathers the next batches' rows into
(pinned, on CUDA) host buffers and, on CUDA, starts their copy to the device on a side stream, while
the current batch trains; the consumer waits for the copy with a stream event, not the host. The
values are the same bytes either way, so with the same index order the two paths give bit-identical
batches (and trials) on the CPU.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator, Sequence

import torch

__all__ = ["DEFAULT_PREFETCH", "device_capacity", "fits_on_device", "iter_batches"]

DEFAULT_PREFETCH = 3
_DONE = object()


def device_capacity(device: torch.device) -> int:
    """Total memory of ``device`` in bytes: the GPU's, or the machine's RAM for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def fits_on_device(nbytes: int, device: torch.device, share: float) -> bool:
    """Whether ``nbytes`` of data may live on ``device`` given the ``share`` (0..1] of its memory
    allotted to resident data."""
    return nbytes <= share * device_capacity(device)


def iter_batches(
    images: torch.Tensor,
    batches: Sequence[torch.Tensor | slice],
    device: torch.device,
    *,
    stream: bool | None = None,
    prefetch: int = DEFAULT_PREFETCH,
) -> Iterator[torch.Tensor]:
    """``images[b]`` on ``device`` for each ``b`` of ``batches`` (index tensors or slices), in order.

    Resident (``images`` already on ``device``): plain indexing. Streamed (``stream``; default:
    whenever ``images`` live in host memory and ``device`` is not the CPU): up to ``prefetch``
    batches are gathered ahead by a background thread; index tensors must then be on the CPU.
    Leaving the loop early stops the thread.
    """
    device = torch.device(device)
    if stream is None:
        stream = images.device != device
    if not stream and images.device == device:
        for b in batches:
            yield images[b]
        return
    if images.device.type != "cpu":  # on another accelerator: a plain copy per batch
        for b in batches:
            yield images[b].to(device)
        return
    streamer = _Streamer(images, batches, device, max(1, prefetch))
    try:
        yield from streamer
    finally:
        streamer.close()


class _Streamer:
    def __init__(self, images: torch.Tensor, batches: Sequence[torch.Tensor | slice], device: torch.device, depth: int) -> None:
        self.images, self.batches, self.device = images, batches, device
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="harness-prefetch", daemon=True)
        self.thread.start()

    def _gather(self, b: torch.Tensor | slice) -> torch.Tensor:
        if isinstance(b, slice):
            rows = self.images[b]
            if not self.cuda:
                return rows.clone()  # a mapped view would keep pages of the file in use
            out = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            return out.copy_(rows)
        if b.device.type != "cpu":
            raise ValueError("streamed batches need their indices on the CPU")
        shape = (b.numel(), *self.images.shape[1:])
        out = torch.empty(shape, dtype=self.images.dtype, pin_memory=self.cuda)
        return torch.index_select(self.images, 0, b, out=out)

    def _produce(self) -> None:
        try:
            for b in self.batches:
                if self.stop.is_set():
                    return
                host = self._gather(b)
                if self.cuda:
                    assert self.copy_stream is not None
                    with torch.cuda.stream(self.copy_stream):
                        on_device = host.to(self.device, non_blocking=True)
                        ready = torch.cuda.Event()
                        ready.record(self.copy_stream)
                    item: object = (on_device, ready)
                else:
                    item = (host, None)
                while not self.stop.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as error:  # handed to the consumer, which raises it
            self._put_final(error)
            return
        self._put_final(_DONE)

    def _put_final(self, item: object) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            batch, ready = item  # type: ignore[misc]
            if ready is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(ready)
                # The copy stream allocated it: tell the allocator the current stream uses it now.
                batch.record_stream(current)
            yield batch

    def close(self) -> None:
        self.stop.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.queue.get(timeout=0.05)
        self.thread.join()
