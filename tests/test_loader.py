"""Which images each step and each evaluation reads."""

import pytest
import torch
from PIL import Image

from repro.data.folder import image_folder
from repro.data.loader import eval_indices, evenly_spaced, iterate, steps_per_epoch, train_batches


def test_pairs_read_disjoint_shards_of_one_shuffle():
    n, batch = 100, 8
    shards = [train_batches(n, batch, 3, r, seed=1, epoch=2) for r in range(3)]
    steps = steps_per_epoch(n, batch, 3)
    assert steps == 4 and all(len(s) == steps for s in shards)
    seen = torch.cat([torch.cat(s) for s in shards])
    assert len(seen) == len(set(seen.tolist())) == steps * 3 * batch  # no image twice in an epoch
    again = train_batches(n, batch, 3, 1, seed=1, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(again, shards[1]))  # both towers of a pair agree
    other_epoch = train_batches(n, batch, 3, 1, seed=1, epoch=3)
    assert not torch.equal(other_epoch[0], shards[1][0])


def test_resuming_inside_an_epoch_continues_the_same_order():
    full = train_batches(50, 5, 2, 0, seed=0, epoch=0)
    rest = train_batches(50, 5, 2, 0, seed=0, epoch=0, start_step=3)
    assert len(rest) == len(full) - 3 and all(torch.equal(a, b) for a, b in zip(rest, full[3:]))


def test_too_small_a_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        steps_per_epoch(10, 8, 2)


@pytest.mark.parametrize("n,replicas,limit", [(10, 1, None), (10, 3, None), (7, 4, None), (1000, 3, 100), (5, 2, 50)])
def test_evaluation_scores_every_image_exactly_once(n, replicas, limit):
    shards = [eval_indices(n, replicas, r, limit) for r in range(replicas)]
    allidx = torch.cat(shards).tolist()
    expected = min(n, limit) if limit else n
    assert len(allidx) == len(set(allidx)) == expected
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_an_evenly_spaced_subset_has_no_repeats_even_where_float32_rounding_would_make_them():
    # 49807 of 50000: a float32 linspace puts 39765.498 and 39766.502 both on 39766.
    assert len(torch.linspace(0, 49999, 49807).round().unique()) < 49807  # the trap is real here
    for n, limit in ((50000, 49807), (50000, 49810), (10000, 300), (7, 2), (7, 7), (1281167, 50000)):
        idx = evenly_spaced(n, limit)
        assert len(idx) == len(idx.unique()) == limit and idx[0] == 0 and idx[-1] == n - 1
        exact = [round(i * (n - 1) / (limit - 1) + 1e-9) for i in range(0, limit, max(1, limit // 97))]
        assert idx[::max(1, limit // 97)].tolist() == exact  # the nearest index to each even position
    assert evenly_spaced(10, 1).tolist() == [0]
    assert torch.equal(evenly_spaced(10000, 300), torch.linspace(0, 9999, 300).round().long())  # earlier runs' subset


def test_a_large_seed_still_gives_an_epoch_order():
    order = train_batches(50, 5, 1, 0, seed=2 ** 63 - 1, epoch=3)
    assert len(order) == 10 and len(torch.cat(order).unique()) == 50


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (30, 20), (i * 50, 0, 0)).save(tmp_path / cls / f"{i}.jpg")
    (tmp_path / "b" / "3.jpg").write_bytes(b"")  # empty
    good = (tmp_path / "a" / "0.jpg").read_bytes()
    (tmp_path / "a" / "9.jpg").write_bytes(good[: len(good) // 2])  # truncated
    src = image_folder(tmp_path, size=32)
    batches = list(iterate(src, [torch.arange(len(src))], workers=0))
    assert batches[0].skipped == 2 and batches[0].images.shape == (6, 32, 32, 3)
    assert batches[0].labels.tolist() == [0, 0, 0, 1, 1, 1]
    with_workers = list(iterate(src, [torch.arange(4), torch.arange(4, len(src))], workers=2))
    assert sum(b.skipped for b in with_workers) == 2 and sum(len(b.labels) for b in with_workers) == 6


def test_loader_workers_ignore_both_stop_signals():
    """A SIGTERM or Ctrl-C to the process group must leave the workers alive for the trainer's save
    (tests/test_train.py signals a whole group with SIGTERM; this checks the handler both get)."""
    import multiprocessing
    import signal

    from repro.data import loader

    def child(queue):
        loader._ignore_stop_signals(0)
        queue.put([signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT)])

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    assert queue.get(timeout=30) == [True, True]
    proc.join()


def test_unreadable_files_are_named_across_workers_and_listed(tmp_path):
    from repro.data.skipped import SKIPPED_FILE, SkippedFiles, read_skipped

    for cls in ("a", "b"):
        for i in range(3):
            (tmp_path / "d" / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (30, 20), (i * 50, 0, 0)).save(tmp_path / "d" / cls / f"{i}.jpg")
    (tmp_path / "d" / "b" / "3.jpg").write_bytes(b"")
    (tmp_path / "d" / "a" / "9.jpg").write_text("not an image")
    src = image_folder(tmp_path / "d", size=16)
    expected = {str(tmp_path / "d" / "a" / "9.jpg"), str(tmp_path / "d" / "b" / "3.jpg")}
    for workers in (0, 2):
        found = SkippedFiles()
        for batch in iterate(src, [torch.arange(4), torch.arange(4, len(src))], workers=workers):
            assert len(batch.unreadable) == batch.skipped
            found.add(batch)
        assert set(found.items) == expected and all(found.items.values())
    line = found.write(tmp_path / "run", "training")
    assert line == f"training: skipped 2 unreadable files, listed in {tmp_path / 'run' / SKIPPED_FILE}"
    listed = dict(read_skipped(tmp_path / "run" / SKIPPED_FILE))
    assert set(listed) == expected and "not found" not in listed[str(tmp_path / "d" / "b" / "3.jpg")]
    assert SkippedFiles.load(tmp_path / "run").items == found.items and found.gather() is found
    assert SkippedFiles().write(tmp_path / "none", "x") is None and not (tmp_path / "none").exists()


def test_skipped_lists_of_all_ranks_merge_through_a_process_group(tmp_path):
    import torch.distributed as dist

    from repro.data.skipped import SkippedFiles, gather_and_write, read_skipped

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mine = SkippedFiles()
        mine.extend([("/d/a/1.jpg", "empty"), ("/d/b/2.jpg", "truncated"), ("/d/a/1.jpg", "again")])
        said = []
        merged = gather_and_write(mine, tmp_path / "run", "epoch 3", True, said.append)
    finally:
        dist.destroy_process_group()
    assert merged is not mine and merged.items == {"/d/a/1.jpg": "empty", "/d/b/2.jpg": "truncated"}
    assert read_skipped(tmp_path / "run" / "skipped.txt") == [("/d/a/1.jpg", "empty"), ("/d/b/2.jpg", "truncated")]
    assert said == [f"epoch 3: skipped 2 unreadable files, listed in {tmp_path / 'run' / 'skipped.txt'}"]
