"""The benchmark script itself, on tiny sizes, so it cannot rot: it runs, prints
every row, and writes JSON whose figures are numbers.  No test asserts a time."""

from __future__ import annotations

import json
import math
import subprocess

from conftest import PY, ROOT, child_env

ROWS = ("limit", "limit_raw", "crypto_raw", "sha256_raw", "limit_receiver",
        "bulk_c2s_process", "bulk_c2s_transfer", "bulk_s2c_transfer", "scp",
        "batch", "handshake_latency", "handshake_rate", "send_text", "ssh_true",
        "rss_c2s", "rss_s2c")
NEED_SSHD = {"scp", "ssh_true"}


def is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def test_quick_bench_prints_every_row_and_writes_numbers(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([PY, "benchmarks/bench.py", "--quick", "--json", str(out),
                        "--tmp-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=100, env=child_env(),
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr

    data = json.loads(out.read_text())
    rows = {row["id"]: row for row in data["rows"]}
    assert tuple(rows) == ROWS
    for key, row in rows.items():
        assert row["label"] in r.stdout, f"row {key} missing from the table"
        if "skipped" in row:
            # only the OpenSSH comparisons may be skipped, and only for want of sshd
            assert key in NEED_SSHD and data["meta"]["sshd"] is None, row
            assert row["skipped"] == "no sshd"
            assert f"skipped: {row['skipped']}" in r.stdout
            continue
        assert row["values"], row
        for name, value in row["values"].items():
            assert is_number(value), (key, name, value)
    assert data["meta"]["quick"] is True
    # the temporary directory (source files, homes, received files) is removed
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]
