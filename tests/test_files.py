"""Workers finishing together on one run folder write trials.csv, best.yaml and report.html at the same moment:
each file ends whole, no writer fails, no temporary file stays behind."""

import multiprocessing
import threading

import pytest

from optimizer.files import temporary_path, write_atomic


def _writer(path, text, rounds, errors):
    try:
        for _ in range(rounds):
            write_atomic(path, text)
    except Exception as exc:  # reported to the test, which fails on any
        errors.append(repr(exc))


def _process_writer(path, text, rounds, queue):
    errors = []
    _writer(path, text, rounds, errors)
    queue.put(errors)


def test_concurrent_writers_of_one_file_each_leave_it_whole(tmp_path):
    path = tmp_path / "trials.csv"
    texts = [f"{'abcd'[i]}," * 50_000 for i in range(4)]  # 100 kB each: a write takes long enough to overlap
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_process_writer, args=(path, t, 100, queue)) for t in texts[:2]]
    for p in procs:
        p.start()
    errors: list[str] = []
    threads = [threading.Thread(target=_writer, args=(path, t, 100, errors)) for t in texts[2:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in procs:
        errors += queue.get(timeout=120)
    for p in procs:
        p.join(timeout=120)
    assert not errors
    assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "best.yaml"
    path.write_text("old\n")
    temporary_path(path).symlink_to("/dev/full")
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "new\n" * 10_000)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["best.yaml"]
