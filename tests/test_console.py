"""The status row of a transfer, as console.Bar words it: one file, or a batch with
its files done of all, the bytes, the speed and the time left."""

from __future__ import annotations

import pytest

import console

MIB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(console.time, "monotonic", c)
    return c


def bar(total: int, desc: str, files: int = 0, elapsed: float = 0.0) -> console.Bar:
    b = console.Transfers().progress(total, desc, files)
    b.started -= elapsed
    return b


def test_a_single_file_shows_percent_and_bytes_then_speed_and_time_left(clock: Clock):
    b = bar(45 * MIB, "sending big.jpg")
    b.update(15 * MIB)
    assert b.line() == "sending big.jpg   33%  15.0 MiB of 45.0 MiB"  # no speed yet
    clock.now += 10  # ten seconds in: 1.5 MiB/s, 30 MiB to go
    assert b.line() == "sending big.jpg   33%  15.0 MiB of 45.0 MiB  1.5 MiB/s  20 s left"


def test_a_batch_counts_files_and_takes_back_the_bytes_of_one_refused(clock: Clock):
    b = bar(60 * MIB, "sending photos", files=4, elapsed=10)
    b.update(15 * MIB)
    b.file_done()
    assert b.line() == \
        "sending photos 1/4   25%  15.0 MiB of 60.0 MiB  1.5 MiB/s  30 s left"
    b.file_done(unsent=15 * MIB)  # refused: its 15 MiB will not move
    assert b.line() == \
        "sending photos 2/4   33%  15.0 MiB of 45.0 MiB  1.5 MiB/s  20 s left"
    b.update(30 * MIB)
    b.file_done()
    b.file_done()
    assert b.line().startswith("sending photos 4/4  100%  45.0 MiB of 45.0 MiB")


def test_a_long_name_gives_way_so_the_speed_and_time_left_stay_in_80_columns(clock: Clock):
    b = bar(45 * MIB, "sending " + "a-very-long-holiday-photo-name"[:30] + ".jpg")
    b.update(15 * MIB)
    clock.now += 10
    row = console.Transfers.status(b.owner, 80)
    assert len(row) == 79
    assert row == \
        "sending a-very-long-holiday-…   33%  15.0 MiB of 45.0 MiB  1.5 MiB/s  20 s left"


def test_the_status_holds_one_row_per_bar_until_it_closes(clock: Clock):
    t = console.Transfers()
    one, batch = t.progress(MIB, "receiving a.jpg"), t.progress(2 * MIB, "sending photos", 2)
    assert t.status(80).splitlines() == ["receiving a.jpg    0%  0 B of 1.0 MiB",
                                         "sending photos 0/2    0%  0 B of 2.0 MiB"]
    one.close()
    batch.close()
    assert t.status(80) == ""


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0 s left"), (59.4, "59 s left"), (60, "1:00 left"), (185, "3:05 left"),
    (3723, "1:02:03 left")])
def test_time_left_reads_like_a_clock(seconds: float, text: str):
    assert console.eta(seconds) == text


class Stream:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_the_main_threads_lines_reach_the_terminal_whole():
    # print() writes a line and its newline separately; a line from another thread
    # (through prompt_toolkit's proxy, onto the same terminal) must not land between
    real, proxy = Stream(), Stream()
    out = console._Router(proxy, real, lambda: False)
    print("delivered", file=out)
    print("two\nlines", file=out)
    print("no newline yet", end="", file=out)
    assert real.writes == ["delivered\n", "two\n", "lines\n"]  # whole lines only
    print(" - now", file=out)
    print("asked: ", end="", file=out, flush=True)
    assert real.writes[3:] == ["no newline yet - now\n", "asked: "]
    assert proxy.writes == []
