"""The sharded stream: one global order split by rank x worker, resume, world-size changes, bad samples."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_ddp.data.sources import DataSource
from ldm_ddp.data.stream import GlobalOrder, ShardedStream, make_loader

RES = 8


class FakeSource(DataSource):
    """`n` 8 px images; index i is red = i % 256, green = i // 256. Some indices raise or have no caption."""

    random_access = True
    latent = False
    has_raw = False
    pairs = False

    def __init__(self, n: int, broken=(), uncaptioned=()):
        self.n, self.broken, self.uncaptioned = n, set(broken), set(uncaptioned)

    def __len__(self):
        return self.n

    def key(self, i: int) -> str:
        return f"fake/{i:05d}"

    def shard_sizes(self) -> None:
        return None

    def __getitem__(self, i: int) -> dict:
        if i in self.broken:
            raise OSError(f"cannot decode {self.key(i)}")
        image = Image.new("RGB", (RES, RES), (i % 256, i // 256, 7))
        return {"image": image, "caption": "" if i in self.uncaptioned else f"caption {i}",
                "key": self.key(i)}

    def fingerprint(self) -> str:
        return f"fake:n={self.n}"


def tokenize(captions: list[str]) -> torch.Tensor:
    """[B] captions -> [B, 1] caption lengths (stands in for a tokenizer; picklable for workers)."""
    return torch.tensor([[len(c)] for c in captions])


def index_of(key: str) -> int:
    return int(key.split("/")[1])


def consume(source, rank, world, batch, accum, num_workers, num_batches, start_step=0, seed=0) -> list[dict]:
    """The first `num_batches` micro-batches the real DataLoader yields for one rank."""
    stream = ShardedStream(source, tokenize, RES, batch, accum, rank, world, seed, start_step)
    loader = make_loader(stream, num_workers, prefetch_batches=2, pin_memory=False)
    return list(itertools.islice(iter(loader), num_batches))


def keys_by_step(source, world, batch, accum, num_workers, steps, start_step=0) -> dict[int, list[str]]:
    """{step: keys consumed in that step by all ranks together}."""
    by_step = {s: [] for s in range(start_step, start_step + steps)}
    for rank in range(world):
        for b in consume(source, rank, world, batch, accum, num_workers, steps * accum, start_step):
            by_step[b["k"] // accum] += b["keys"]
    return by_step


def global_keys(source, first: int, last: int, seed: int = 0) -> list[str]:
    order = GlobalOrder(len(source), seed)
    return [source.key(order.index(g)) for g in range(first, last)]


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_and_workers_cover_the_global_sequence(world, num_workers, accum):
    batch, steps = 2, 3
    G = batch * world * accum
    source = FakeSource(200)
    counts = []
    by_step = {s: [] for s in range(steps)}
    for rank in range(world):
        stream = ShardedStream(source, tokenize, RES, batch, accum, rank, world, seed=0)
        batches = consume(source, rank, world, batch, accum, num_workers, steps * accum)
        counts.append(len(batches))
        for k, b in enumerate(batches):
            # The loader interleaves workers back into the rank's own order: micro-batch k, k+1, ...
            assert b["k"] == k
            expected = [source.key(stream.order.index(g)) for g in stream.positions(k)]
            assert b["keys"] == expected
            assert b["images"].shape == (batch, 3, RES, RES)
            red = b["images"][:, 0, 0, 0]  # uint8 pixels: they belong to the named samples
            assert red.tolist() == [index_of(key) % 256 for key in b["keys"]]
            assert b["input_ids"].shape == (batch, 1)
            assert b["captions"] == [f"caption {index_of(key)}" for key in b["keys"]]
            by_step[k // accum] += b["keys"]
    assert counts == [steps * accum] * world
    for s in range(steps):  # step s consumes exactly positions [s*G, (s+1)*G), no more, no less
        assert sorted(by_step[s]) == sorted(global_keys(source, s * G, (s + 1) * G))
    everything = [key for s in range(steps) for key in by_step[s]]
    assert len(set(everything)) == len(everything) == steps * G


def test_the_sequence_continues_across_epochs():
    source = FakeSource(10)
    # 20 positions, 2 epochs
    by_step = keys_by_step(source, world=2, batch=2, accum=1, num_workers=2, steps=5)
    consumed = [k for s in range(5) for k in by_step[s]]
    assert sorted(consumed) == sorted(global_keys(source, 0, 20))
    assert sorted(consumed) == sorted([source.key(i) for i in range(10)] * 2)  # each sample once per epoch


@pytest.mark.parametrize("world, accum, num_workers", [(1, 1, 0), (2, 2, 2), (3, 1, 1)])
def test_start_step_continues_where_an_uninterrupted_stream_would_be(world, accum, num_workers):
    source = FakeSource(300)
    for rank in range(world):
        straight = consume(source, rank, world, 2, accum, num_workers, 5 * accum)
        resumed = consume(source, rank, world, 2, accum, num_workers, 2 * accum, start_step=3)
        assert [b["k"] for b in resumed] == [b["k"] for b in straight[3 * accum:]]
        assert [b["keys"] for b in resumed] == [b["keys"] for b in straight[3 * accum:]]
        assert all(torch.equal(a["images"], b["images"]) for a, b in zip(resumed, straight[3 * accum:]))


@pytest.mark.parametrize("before, after", [
    ((2, 2, 1), (1, 2, 2)),  # 2 ranks x 2, then 1 rank x 2 with grad_accum 2: G = 4 throughout
    ((1, 4, 1), (4, 1, 1)),  # 1 rank x 4, then 4 ranks x 1
    ((3, 2, 2), (2, 3, 2)),  # G = 12: 3 ranks x 2 x 2, then 2 ranks x 3 x 2
])
def test_a_new_world_size_with_the_same_global_batch_continues_the_sequence(before, after):
    source = FakeSource(500)
    (w1, b1, a1), (w2, b2, a2) = before, after
    G = w1 * b1 * a1
    assert G == w2 * b2 * a2
    first = keys_by_step(source, w1, b1, a1, num_workers=1, steps=3)
    second = keys_by_step(source, w2, b2, a2, num_workers=2, steps=3, start_step=3)
    consumed = [k for part in (first, second) for s in sorted(part) for k in part[s]]
    assert len(set(consumed)) == len(consumed)  # no sample twice
    assert sorted(consumed) == sorted(global_keys(source, 0, 6 * G))  # none skipped
    for s in range(3, 6):
        assert sorted(second[s]) == sorted(global_keys(source, s * G, (s + 1) * G))


def test_global_order_is_a_permutation_per_epoch():
    n = 50
    order = GlobalOrder(n, seed=0)
    epochs = [[order.index(e * n + i) for i in range(n)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(n))  # shuffled
    other_seed = GlobalOrder(n, seed=1)
    assert [other_seed.index(i) for i in range(n)] != epochs[0]
    # Random access (back to an earlier epoch, a fresh instance) gives the same answer.
    again = GlobalOrder(n, seed=0)
    looked_up = [again.index(g) for g in (2 * n + 5, 7, n + 3, 7)]
    assert looked_up == [epochs[2][5], epochs[0][7], epochs[1][3], epochs[0][7]]


def next_good(source, i: int) -> tuple[int, list[str]]:
    """The replacement rule for a set of at most 2 x MAX_SUBSTITUTIONS samples (stride 1): the next index
    (wrapping) that loads and has a caption, and the skipped keys."""
    skipped = []
    while i in source.broken or i in source.uncaptioned:
        skipped.append(source.key(i))
        i = (i + 1) % len(source)
    return i, skipped


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_replaced_by_the_next_good_index_and_named(num_workers):
    n = 24
    source = FakeSource(n, broken={3, 4, 10, n - 1}, uncaptioned={5, 17})
    world, batch, steps = 2, 3, 4  # 24 positions: every index once, so every bad one is met
    order = GlobalOrder(n, seed=0)
    total_bad = 0
    for rank in range(world):
        stream = ShardedStream(source, tokenize, RES, batch, 1, rank, world, seed=0)
        for k, b in enumerate(consume(source, rank, world, batch, 1, num_workers, steps)):
            assert len(b["keys"]) == len(b["captions"]) == b["images"].shape[0] == batch
            expected_keys, expected_bad = [], []
            for g in stream.positions(k):
                good, skipped = next_good(source, order.index(g))
                expected_keys.append(source.key(good))
                expected_bad += skipped
            assert b["keys"] == expected_keys
            assert all(c for c in b["captions"])
            assert [entry[0] for entry in b["bad"]] == expected_bad
            total_bad += len(b["bad"])
    # 3 -> 4 -> 5 -> 6: index 3 costs 3 substitutions, 4 costs 2, 5 one; 10, 17 one each; n-1 wraps to 0.
    assert total_bad == 3 + 2 + 1 + 1 + 1 + 1


def test_bad_sample_reasons_are_named():
    source = FakeSource(8, broken={2}, uncaptioned={3})
    stream = ShardedStream(source, tokenize, RES, 1, 1, 0, 1, seed=0)
    sample, bad = stream.load(2)
    assert sample["key"] == "fake/00004"
    assert (bad[0][0] == "fake/00002" and bad[0][1].startswith("OSError")
            and bad[1] == ("fake/00003", "ValueError: empty caption"))
    sample, bad = stream.load(6)
    assert sample["key"] == "fake/00006" and bad == []


def test_an_unbroken_run_of_bad_samples_fails_with_a_clear_error():
    source = FakeSource(40, broken=range(40))
    stream = ShardedStream(source, tokenize, RES, 1, 1, 0, 1, seed=0)
    with pytest.raises(RuntimeError, match="16 bad samples in a row for position 0"):
        stream.load(0)


def test_a_data_failure_from_a_worker_reads_as_one_line():
    """Re-raised in the training process, a DataLoader worker's exception carries the worker's traceback in
    its message: the entry point prints DataFailure.one_line(), the original message alone."""
    from torch.utils.data import DataLoader, Dataset

    from ldm_ddp.data.stream import DataFailure

    class Failing(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise DataFailure("data: 16 bad samples in a row for position 7 "
                              "(its own and every substitute): k")

    with pytest.raises(DataFailure) as err:
        next(iter(DataLoader(Failing(), num_workers=1)))
    assert "Traceback" in str(err.value)  # what the worker's re-raise looks like
    assert err.value.one_line() == ("data: 16 bad samples in a row for position 7 "
                                    "(its own and every substitute): k")


def test_a_shard_that_fails_as_a_whole_is_replaced_from_elsewhere():
    """Substitutes are spread over the dataset: 40 neighbouring indices broken (one shard) cost each position
    at most two substitutions, where the next 16 neighbours would all have failed."""
    from ldm_ddp.data.stream import MAX_SUBSTITUTIONS, substitutes
    assert substitutes(5, 24)[:3] == [5, 6, 7]  # small sets: the next indices
    assert substitutes(0, 320) == [20 * a for a in range(MAX_SUBSTITUTIONS)]
    source = FakeSource(320, broken=range(100, 140))
    stream = ShardedStream(source, tokenize, RES, 1, 1, 0, 1, seed=0)
    for index in (100, 119, 139):
        sample, bad = stream.load(index)
        assert 1 <= len(bad) <= 2 and not 100 <= int(sample["key"].split("/")[1]) < 140


def test_images_are_resized_and_centre_cropped():
    from ldm_ddp.data.transforms import ImageTransform
    image = Image.fromarray(np.full((12, 24, 3), 255, dtype=np.uint8))  # 24 x 12 px, white
    tensor = ImageTransform(RES)(image)
    assert tensor.shape == (3, RES, RES) and tensor.dtype == torch.uint8
    assert torch.all(tensor == 255)
    grey = ImageTransform(RES)(Image.new("L", (RES, RES), 0))
    assert grey.shape == (3, RES, RES) and torch.all(grey == 0)


def test_a_stream_that_drops_its_connection_is_reopened_and_the_sample_kept():
    """A sequential source's stream that fails once mid-epoch (a dropped connection) is reopened and read up
    to the same record: no sample replaced. One that keeps failing raises (the caller replaces the sample)."""
    from ldm_ddp.data.stream import StreamReader

    class Flaky:
        def __init__(self, failures: int):
            self.failures, self.opened = failures, 0

        def __len__(self):
            return 10

        def records(self, epoch):
            self.opened += 1
            for i in range(10):
                if i == 3 and self.failures:
                    self.failures -= 1
                    raise ConnectionError("connection reset by peer")
                yield {"key": f"e{epoch}/{i}"}

    source = Flaky(failures=1)
    reader = StreamReader(source)
    assert reader.get(5)["key"] == "e0/5" and source.opened == 2
    assert reader.get(6)["key"] == "e0/6" and source.opened == 2  # read on from the reopened stream
    broken = StreamReader(Flaky(failures=100))
    with pytest.raises(ConnectionError):
        broken.get(5)
    assert broken.epoch == -1  # the next read reopens
