"""Host batches prepared one step ahead on a thread, so the host's work overlaps the device's.

    batches = Prefetched(iter(dataset), prepare=pose_hook)
    batch = next(batches)          # drawn and prepared while the previous step ran on the devices
    checkpoints.save(step, state, batches)   # the iterator's state after `batch`, not after the one in flight

The training loop dispatches step k and then waits for its metrics; meanwhile this thread draws batch k+1 from the
grain iterator and runs `prepare` on it (the annotated-pose hook: SwinIR and the annotator, host work that would
otherwise add to every step). One batch ahead is enough: the host work only has to hide behind one device step.

The grain iterator has moved one batch past the one the loop holds, so its own state is the wrong one to save:
each batch carries the iterator's state captured right after it was drawn, and `get_state` returns the state of
the last batch handed out. A run resumed from that state draws exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator

_DONE = object()


def _serialized(state) -> bytes:
    """A grain iterator's state as grain's checkpoint handler writes it: a dataset iterator's dict as JSON, a data
    loader's bytes as they are."""
    return state if isinstance(state, bytes) else json.dumps(state).encode()


class Prefetched:
    """`prepare(next(iterator))` computed one batch ahead on a daemon thread.

    get_state() -> bytes: the iterator's state after the last batch `__next__` returned (JSON; grain's checkpoint
    handler stores it as the iterator's own state, so a plain grain iterator restores from it). An exception in
    the thread (drawing or preparing) is raised by the `__next__` that would have returned that batch.
    """

    def __init__(self, iterator: Iterator[dict], prepare: Callable[[dict], dict] | None = None):
        self._iterator, self._prepare = iterator, prepare
        first = iterator.get_state()
        self._bytes_state = isinstance(first, bytes)
        self._state = _serialized(first)  # before any batch: a checkpoint at step 0 resumes at the start
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="prefetch-host-batches", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self._iterator)
                state = _serialized(self._iterator.get_state())  # now: the live state moves on with the next draw
                if self._prepare is not None:
                    batch = self._prepare(batch)
                self._put((batch, state, None))
        except StopIteration:
            self._put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it where the batch was expected
            self._put((None, None, e))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self) -> dict:
        item = self._ready.get()
        if item is _DONE:
            self._ready.put(_DONE)
            raise StopIteration
        batch, state, error = item
        if error is not None:
            self._ready.put(item)  # the thread has stopped: a later call raises the same error instead of waiting
            raise error
        self._state = state
        return batch

    def get_state(self) -> bytes:
        return self._state

    def close(self) -> None:
        """Stops the thread (it may finish the batch it is preparing first) and sets the iterator back to the state
        of the last batch handed out: whoever draws from it next gets the batch this would have returned next."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            raise RuntimeError("prefetch thread still running 60 s after close(); the iterator was left as it was")
        state = self._state if self._bytes_state else json.loads(self._state)
        self._iterator.set_state(state)

    def __enter__(self) -> Prefetched:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
