"""An annotator run over many images at once, in worker processes of its own.

    with AnnotatorPool("mediapipe", workers=4) as pool:
        annotations = pool.map(images)        # [Annotation], in the order of `images`

The annotators are host programs (mediapipe's graph, onnxruntime sessions) that take about 0.1 s per image; a
training step at batch 128 would spend seconds annotating one image after another. Processes, not threads: neither
backend promises that one instance may be called from several threads, and a process per worker also gets around
the interpreter lock for the Python parts (drawing, resizing). Each worker builds its own annotator once, from a
spec ("backend[:key=value,...]") or by unpickling the callable it was given. The workers are started with "spawn"
(a training process runs jax's threads, which a fork would copy in a broken state) and import no jax.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from diffbody_jax.annotators.annotate import annotator_from_spec
from diffbody_jax.annotators.base import Annotation

_worker_annotator: Callable | None = None  # this worker process's annotator, built once by _start_worker


def _start_worker(annotator: str | Callable) -> None:
    global _worker_annotator
    _worker_annotator = annotator_from_spec(annotator) if isinstance(annotator, str) else annotator


def _annotate(image: np.ndarray) -> Annotation:
    return _worker_annotator(image)


class AnnotatorPool:
    """`annotator` (a spec or a picklable callable image -> Annotation) over `workers` processes; workers=0 runs it
    in this process, one image after another (the same annotations, in the same order)."""

    def __init__(self, annotator: str | Callable, workers: int = 0):
        if workers < 0:
            raise ValueError(f"AnnotatorPool: workers={workers}; expected 0 (in this process) or more")
        self.workers = workers
        self._executor = None
        # built here whatever `workers` is: a bad spec (a missing model file, an unknown option) fails now, in
        # this process, with the annotator's own message, not in a worker at the first batch
        self._annotator = annotator_from_spec(annotator) if isinstance(annotator, str) else annotator
        if workers > 0:
            self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker, initargs=(annotator,))

    def map(self, images: Sequence[np.ndarray]) -> list[Annotation]:
        if self._executor is None:
            return [self._annotator(image) for image in images]
        return list(self._executor.map(_annotate, images))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> AnnotatorPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
