"""data.prefetch.Prefetched: the prepared batches of the plain iterator, in order; its state after each batch is
the plain iterator's after the same batch (a resumed iterator goes on from there, and so does the iterator itself
once closed); the next batch is prepared while the consumer still holds the current one; an error in the thread
reaches the consumer at that batch."""

import json
import threading

import grain
import numpy as np
import pytest

from diffbody_jax.data.prefetch import Prefetched


def _iterator(rng_seed: int):
    values = np.random.default_rng(rng_seed).random((12, 3))
    return iter(grain.MapDataset.source(list(values)).shuffle(seed=rng_seed).batch(2).to_iter_dataset())


def test_batches_and_states_equal_the_plain_iterators(seed):
    plain = _iterator(seed)
    expected = []
    for _ in range(4):
        batch = next(plain)
        expected.append((batch * 2, plain.get_state()))
    with Prefetched(_iterator(seed), prepare=lambda b: b * 2) as batches:
        for want, state in expected:
            np.testing.assert_array_equal(next(batches), want)
            assert json.loads(batches.get_state()) == state  # not the state of the batch prepared ahead
        saved = json.loads(batches.get_state())
        inner = batches._iterator
    resumed = _iterator(seed)
    resumed.set_state(saved)
    following = next(plain)
    np.testing.assert_array_equal(next(resumed), following)
    np.testing.assert_array_equal(next(inner), following)  # closing set the iterator back to the batch in use


def test_the_next_batch_is_prepared_while_the_current_one_is_held(seed):
    prepared = []
    second = threading.Event()

    def prepare(batch):
        prepared.append(batch)
        if len(prepared) == 2:
            second.set()
        return batch

    with Prefetched(_iterator(seed), prepare) as batches:
        next(batches)
        assert second.wait(timeout=30), "the second batch was not prepared before it was asked for"
        assert len(prepared) <= 3  # at most one batch ahead of the consumer (plus one waiting to be queued)


def _raised(batches) -> BaseException | None:
    try:
        next(batches)
    except BaseException as e:  # noqa: BLE001 - the test looks at whatever was raised
        return e
    return None


def test_an_error_in_the_thread_is_raised_where_its_batch_was_due(seed):
    calls = []

    def prepare(batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("annotator crashed on batch 3")
        return batch

    with Prefetched(_iterator(seed), prepare) as batches:
        next(batches), next(batches)
        with pytest.raises(RuntimeError, match="batch 3"):
            next(batches)
        # again, not a wait on a thread that has stopped (asked on a daemon thread of its own, bounded)
        raised = []
        asker = threading.Thread(target=lambda: raised.append(_raised(batches)), daemon=True)
        asker.start()
        asker.join(timeout=10)
        assert raised and "batch 3" in str(raised[0]), "a second next() after the error waited instead of raising"
    with Prefetched(_iterator(seed)) as batches:  # no prepare: the iterator's batches, then StopIteration
        assert len(list(batches)) == 6
