"""The bulk entry points' stderr filter drops Ray's one driver line about Ray Data's actor pools and
passes everything else through, in order, unfinished text at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

RAY_DATA_LINE = (b"[2026-12-07 11:42:30,163 E 15630 15675] core_worker.cc:2465: Actor with class name: "
                 b"'MapWorker(MapBatches(BulkScorer))' and ID: '17ad6dfb2f749f8df2dfd1a303000000' has constructor "
                 b"arguments in the object store and max_restarts > 0. If the arguments in the object store go out "
                 b"of scope or are lost, the actor restart will fail. See "
                 b"https://github.com/ray-project/ray/issues/53727 for more details.\n")

CHILD = textwrap.dedent("""
    import os, sys, time
    from plantad.logs import skip_driver_lines
    line = sys.stdin.buffer.readline()
    with skip_driver_lines():
        os.write(2, b"before\\n")
        os.write(2, line[:40])  # a C++ line may arrive in pieces
        time.sleep(0.2)
        os.write(2, line[40:])
        os.write(2, line.replace(b"Actor with class name", b"Task with class name"))  # any other E line stays
        print("a python line", file=sys.stderr)
        os.write(2, b"\\rbar 1")
        time.sleep(float(sys.argv[1]))
        os.write(2, b"\\rbar 2\\n")
    os.write(2, b"after\\n")
""")


def test_the_ray_data_line_is_dropped_and_the_rest_passes_in_order() -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, "0"], input=RAY_DATA_LINE, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    other = RAY_DATA_LINE.replace(b"Actor with class name", b"Task with class name")
    assert proc.stderr == b"before\n" + other + b"a python line\n\rbar 1\rbar 2\nafter\n"


def test_unfinished_text_goes_out_at_once() -> None:
    """A progress bar rewrites one line with carriage returns: its updates must not wait for a newline."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "8"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    proc.stdin.write(RAY_DATA_LINE)
    proc.stdin.close()
    try:
        seen = b""
        while b"\rbar 1" not in seen:
            chunk = proc.stderr.read1(4096)
            assert chunk, f"the child ended before its progress text: {seen!r}"
            seen += chunk
        assert b"bar 2" not in seen, "the progress text came out only with the next line"
        shown = time.monotonic()
        assert proc.wait(30) == 0
        assert time.monotonic() - shown > 5, "the progress text came out only when the child ended"
    finally:
        proc.kill()
