"""Reading .jsonl records: a line over the record limit is refused with its line number and
skipped without ever being held whole; the lines around it are read as usual."""

import json
import tracemalloc

from xft_megatron.data import records
from xft_megatron.data.records import RecordError, read_records


def test_an_oversized_line_is_refused_with_its_number_and_the_rest_is_read(
        tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1000)
    ok = json.dumps({"text": "a"})
    at_limit = json.dumps({"text": "b" * (1000 - 12)})  # 1000 bytes, then its newline
    assert len(at_limit) == 1000
    path = tmp_path / "d.jsonl"
    path.write_bytes("\n".join([ok, "x" * 5000, at_limit, "", ok, "y" * 3000]).encode())
    got = list(read_records(str(path)))
    assert [loc for loc, _ in got] == [f"{path}:{n}" for n in (1, 2, 3, 5, 6)]
    assert got[0][1] == {"text": "a"} and got[3][1] == {"text": "a"}
    assert got[2][1]["text"] == "b" * 988  # exactly the limit: read
    for (_, err), size in ((got[1], 5001), (got[4], 3000)):  # the last has no newline
        assert isinstance(err, RecordError) and err.reason == "too_large"
        assert f"line of {size:,} bytes, over the 1,000-byte limit" in str(err)


def test_an_oversized_line_is_never_held_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_RECORD_BYTES", 1 << 20)
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "' + b"z" * (40 << 20) + b'"}\n{"text": "after"}\n')
    tracemalloc.start()
    try:
        got = list(read_records(str(path)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got[0][1].reason == "too_large" and got[1][1] == {"text": "after"}
    assert peak < 8 << 20, peak  # a 40 MiB line, read in pieces of at most ~1 MiB
