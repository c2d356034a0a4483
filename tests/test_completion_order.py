"""The in-order completion of received files (session.IncomingFile._in_order): one
finisher at a time completes every file whose turn it is, in the order the files
ended, with one directory flush per group; a finisher that finds it busy leaves
its file to the busy one, which looks again once it is done."""

import threading
from collections import deque
from types import SimpleNamespace

import pytest

import session
import transfer


def completions(tmp_path, order: list):
    """An IncomingFile reduced to what the completion uses, ops 1..3 ended in order."""
    inc = session.IncomingFile.__new__(session.IncomingFile)
    inc._conn = SimpleNamespace(received_dir=str(tmp_path))
    inc._ending = deque([1, 2, 3])
    inc._ready = {}
    inc._lock = threading.Lock()
    inc._report_lock = threading.Lock()

    def complete(op, then=None):
        def run():  # verify and link (in order), then report once the directory is flushed
            order.append(("linked", op))

            def report(dir_error):
                order.append(("saved", op, dir_error))
                if then is not None:
                    then()
            return report, True
        return run
    return inc, complete


def dir_flush_fails(directory):
    raise OSError(5, "Input/output error")


def test_files_are_completed_in_the_order_they_ended_whoever_flushed_first(tmp_path, monkeypatch):
    order: list = []
    flushes = []
    monkeypatch.setattr(transfer, "flush_dir", lambda d: flushes.append(len(order)))
    inc, complete = completions(tmp_path, order)
    inc._in_order(3, complete(3))  # flushed first, but it ended last: waits
    inc._in_order(2, complete(2))
    assert order == [] and flushes == []
    inc._in_order(1, complete(1))  # the head: 1, 2 and 3 now, one directory flush
    assert order == [("linked", 1), ("linked", 2), ("linked", 3),
                     ("saved", 1, None), ("saved", 2, None), ("saved", 3, None)]
    assert flushes == [3]  # after the three links, before any of them is reported saved
    assert not inc._ready and not inc._ending


def test_a_file_left_to_a_busy_finisher_is_completed_by_it(tmp_path, monkeypatch):
    """File 2 becomes ready while file 1's finisher is reporting (its lock held):
    2's own finisher returns at once, and 1's completes 2 after releasing the lock."""
    order: list = []
    monkeypatch.setattr(transfer, "flush_dir", lambda d: order.append("flush"))
    inc, complete = completions(tmp_path, order)
    returned = []

    def second_finisher():  # runs while the first holds the lock: must not wait for it
        inc._in_order(2, complete(2))
        returned.append(("returned", 2))
        assert inc._report_lock.locked()

    inc._in_order(1, complete(1, then=second_finisher))
    assert order == [("linked", 1), "flush", ("saved", 1, None),
                     ("linked", 2), "flush", ("saved", 2, None)]
    assert returned == [("returned", 2)]
    assert not inc._ready and list(inc._ending) == [3]


def test_a_failed_directory_flush_fails_every_file_of_its_group(tmp_path, monkeypatch):
    order: list = []
    monkeypatch.setattr(transfer, "flush_dir", dir_flush_fails)
    inc, complete = completions(tmp_path, order)
    inc._in_order(2, complete(2))
    inc._in_order(1, complete(1))
    saved = [e for e in order if e[0] == "saved"]
    assert [op for _, op, _ in saved] == [1, 2]
    assert all(isinstance(err, transfer.Rejected) and "cannot flush the directory" in err.detail
               for _, _, err in saved)


def its_line_cannot_be_written():
    raise OSError(28, "No space left on device")


def test_a_report_that_fails_does_not_stop_the_rest_of_its_group(tmp_path, monkeypatch):
    """File 1's report raises (its line cannot be written) after a failed directory
    flush: file 2's report still runs (it removes its link, as that flush failed),
    and the exception comes out once the group is done."""
    order: list = []
    monkeypatch.setattr(transfer, "flush_dir", dir_flush_fails)
    inc, complete = completions(tmp_path, order)
    inc._in_order(2, complete(2))
    with pytest.raises(OSError, match="No space left on device"):
        inc._in_order(1, complete(1, then=its_line_cannot_be_written))
    assert [e[:2] for e in order] == [("linked", 1), ("linked", 2), ("saved", 1), ("saved", 2)]
    assert isinstance(order[-1][2], transfer.Rejected)
    assert not inc._ready and list(inc._ending) == [3]


def test_a_finisher_whose_report_fails_still_completes_the_file_left_to_it(tmp_path,
                                                                           monkeypatch):
    """File 2 is left to file 1's finisher while it reports, and that report then
    raises: the finisher still looks again and completes file 2 before it raises."""
    order: list = []
    monkeypatch.setattr(transfer, "flush_dir", lambda d: order.append("flush"))
    inc, complete = completions(tmp_path, order)

    def second_finisher_then_fail():
        inc._in_order(2, complete(2))  # the lock is held: left to the first finisher
        its_line_cannot_be_written()

    with pytest.raises(OSError, match="No space left on device"):
        inc._in_order(1, complete(1, then=second_finisher_then_fail))
    assert order == [("linked", 1), "flush", ("saved", 1, None),
                     ("linked", 2), "flush", ("saved", 2, None)]
    assert not inc._ready and list(inc._ending) == [3]
