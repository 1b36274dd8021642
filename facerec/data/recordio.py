"""MXNet RecordIO (`.rec` + `.idx`) and its image-record header, read and written without mxnet.

Framing (dmlc-core recordio): each record part is `magic (uint32 0xced7230a) |
lrec (uint32: continuation flag in the top 3 bits, length in the low 29) | data |
zero padding to 4 bytes`. The writer splits a payload wherever the magic number
appears at a 4-byte aligned offset and drops those 4 bytes (flags 1 = first part,
2 = middle, 3 = last; 0 = whole record); the reader puts the magic back between
parts. `.idx` is text, one `key<TAB>byte offset` line per record.

Image records (mx.recordio.pack) start with IRHeader = `flag (uint32) | label
(float32) | id (uint64) | id2 (uint64)`; when flag > 0 the label is instead the
`flag` float32 values that follow the header.
"""
from __future__ import annotations

import os
import struct
import warnings
from array import array
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
_LENGTH_BITS = 29
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1
_IR_HEADER = struct.Struct("<IfQQ")


class RecordIOError(ValueError):
    """A .rec/.idx pair that does not follow the format (truncated, mismatched, corrupt framing)."""


class IRHeader(NamedTuple):
    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(label, payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """IRHeader + payload, as mx.recordio.pack: a scalar label goes in the header, a sequence after it."""
    if np.ndim(label) == 0:
        return _IR_HEADER.pack(0, float(label), id, id2) + payload
    labels = np.asarray(label, dtype="<f4").reshape(-1)
    return _IR_HEADER.pack(len(labels), 0.0, id, id2) + labels.tobytes() + payload


def unpack_record(record: bytes) -> tuple[IRHeader, bytes]:
    """(header, payload) of an image record; header.label is a float or a float32 array (flag > 0)."""
    if len(record) < _IR_HEADER.size:
        raise RecordIOError(f"record of {len(record)} bytes is shorter than the {_IR_HEADER.size}-byte image header")
    flag, label, id_, id2 = _IR_HEADER.unpack_from(record)
    payload_start = _IR_HEADER.size + 4 * flag
    if flag > 0:
        if len(record) < payload_start:
            raise RecordIOError(f"image header announces {flag} labels but the record holds {len(record)} bytes")
        label = np.frombuffer(record, dtype="<f4", count=flag, offset=_IR_HEADER.size)
    return IRHeader(flag, label, id_, id2), record[payload_start:]


def read_index(idx_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, byte offsets) of a `.idx` file, as int64 arrays (numpy, not dicts: millions of records
    stay compact and are shared copy-on-write by forked DataLoader workers). Every writer ends each
    line with a line break: a file that does not was cut short, and its last offset may be a prefix
    of the real one."""
    raw = Path(idx_path).read_text("ascii")
    text = raw.strip()
    if text and not raw.endswith("\n"):
        last = text.rsplit("\n", 1)[-1]
        raise RecordIOError(f"{idx_path}: its last line ({last!r}) has no line break: the .idx is truncated")
    lines = text.count("\n") + 1 if text else 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (then stops) at the first token it cannot parse
            values = np.fromstring(text, dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning) as error:
        raise RecordIOError(f"{idx_path}: not a RecordIO index (expected 'key<TAB>offset' lines): {error}") from None
    if len(values) != 2 * lines:
        raise RecordIOError(f"{idx_path}: expected 2 integers on each of {lines} lines, found {len(values)} in all")
    keys, offsets = values[0::2].copy(), values[1::2].copy()
    if len(np.unique(keys)) != len(keys):
        raise RecordIOError(f"{idx_path}: repeated record keys")
    if len(np.unique(offsets)) != len(offsets):
        raise RecordIOError(f"{idx_path}: two records start at the same byte: the .idx is corrupt")
    return keys, offsets


class RecordIOReader:
    """Random access to the records of a `.rec` file through its `.idx`.

    The file is opened lazily in each process (DataLoader workers, DDP ranks) and
    read with `os.pread`, so one reader can be pickled to workers and used from
    threads without a shared file position.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path):
        self._fd: int | None = None
        self._pid: int | None = None
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(f"RecordIO file not found: {path}")
        self.keys, self.offsets = read_index(self.idx_path)
        self.file_size = self.rec_path.stat().st_size
        if len(self.keys) == 0:
            raise RecordIOError(f"{self.idx_path} lists no records")
        bad = (self.offsets < 0) | (self.offsets + _FRAME.size > self.file_size)
        if bad.any():
            key, offset = self.keys[bad][0], self.offsets[bad][0]
            raise RecordIOError(
                f"{self.idx_path} does not match {self.rec_path}: record {key} at byte {offset} lies beyond the "
                f"end of the {self.file_size}-byte file ({int(bad.sum())} such records); the .rec is truncated "
                "or the .idx belongs to another file"
            )
        # A record ends where the next one (in file order) begins: one pread reads it whole.
        order = np.argsort(self.offsets, kind="stable")
        ends = np.empty_like(self.offsets)
        ends[order] = np.append(self.offsets[order][1:], self.file_size)
        self.ends = ends
        # insightface indexes hold keys 0..n-1 in order: the key is the row. Otherwise binary search.
        self._key_order = None if np.array_equal(self.keys, np.arange(len(self.keys))) else np.argsort(self.keys)
        self._sorted_keys = None if self._key_order is None else self.keys[self._key_order]
        # Check the first and the last record in the file and the index's last line: a truncated
        # file or a foreign .idx fails here. And after the last record the .rec must end: more
        # records there are records the .idx does not list (an index cut at a line break).
        last = int(order[-1])
        for row in {int(order[0]), len(self.keys) - 1} - {last}:
            self._read_at(row)
        _, consumed = self._frames(last)
        after = int(self.offsets[last]) + consumed
        if after + _FRAME.size <= self.file_size and os.pread(self._file(), 4, after) == _MAGIC_BYTES:
            raise RecordIOError(
                f"{self.rec_path} holds records after the last one {self.idx_path} lists (byte {after} of "
                f"{self.file_size}): the .idx is truncated"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def row(self, key: int) -> int:
        """Row of record `key` in the index arrays."""
        if self._key_order is None:
            row = int(key) if 0 <= key < len(self.keys) else -1
        else:
            i = int(np.searchsorted(self._sorted_keys, key))
            row = int(self._key_order[i]) if i < len(self._sorted_keys) and self._sorted_keys[i] == key else -1
        if row < 0:
            raise KeyError(f"record {key} is not in {self.idx_path}")
        return row

    def read(self, key: int) -> bytes:
        """The payload of record `key` (parts joined, padding removed)."""
        return self._read_at(self.row(key))

    def _read_at(self, row: int) -> bytes:
        return self._frames(row)[0]

    def _frames(self, row: int) -> tuple[bytes, int]:
        """(payload of the record at `row`, the bytes its frames take in the file)."""
        key, start, end = int(self.keys[row]), int(self.offsets[row]), int(self.ends[row])
        raw = os.pread(self._file(), end - start, start)
        parts, cursor = [], 0
        mismatch = f"{self.idx_path} does not match {self.rec_path}, or one of them is truncated or corrupt"
        while True:
            if cursor + _FRAME.size > len(raw):
                raise RecordIOError(
                    f"{self.rec_path}: record {key} (byte {start}) ends inside a frame header, {len(raw) - cursor} "
                    f"bytes before the next record or the end of the file; {mismatch}"
                )
            magic, lrec = _FRAME.unpack_from(raw, cursor)
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: no RecordIO magic at byte {start + cursor} for record {key} "
                    f"(found {magic:#010x}); {mismatch}"
                )
            flag, length = lrec >> _LENGTH_BITS, lrec & _MAX_LENGTH
            cursor += _FRAME.size
            if cursor + length > len(raw):
                raise RecordIOError(
                    f"{self.rec_path}: record {key} at byte {start} claims {length} bytes but only "
                    f"{len(raw) - cursor} remain before the next record or the end of the file; {mismatch}"
                )
            parts.append(raw[cursor : cursor + length])
            cursor += (length + 3) & ~3
            if flag in (0, 3):
                return _MAGIC_BYTES.join(parts), cursor
            if flag not in (1, 2):
                raise RecordIOError(f"{self.rec_path}: record {key} has an invalid continuation flag {flag}")


class RecordIOWriter:
    """Writes records, then (on close) the `.idx` sorted by key; use as a context manager.

    Records may be written in any key order (e.g. a header record last, once its
    counts are known); readers find them through the index.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path):
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._keys, self._offsets = array("q"), array("q")

    def write(self, key: int, payload: bytes) -> None:
        self._keys.append(int(key))
        self._offsets.append(self._rec.tell())
        # Split where the magic number sits at an aligned offset, so sequential readers that
        # resynchronise on the magic (mxnet, DALI) never see it inside a record.
        cuts, at = [], payload.find(_MAGIC_BYTES)
        while at >= 0:
            if at % 4 == 0:
                cuts.append(at)
            at = payload.find(_MAGIC_BYTES, at + (4 if at % 4 == 0 else 1))
        starts, stops = [0] + [i + 4 for i in cuts], cuts + [len(payload)]
        for part, (begin, stop) in enumerate(zip(starts, stops)):
            length = stop - begin
            if length > _MAX_LENGTH:
                raise ValueError(f"{self.rec_path}: record {key} part of {length} bytes exceeds the 2^29 - 1 limit")
            last, first = part == len(cuts), part == 0
            flag = 0 if (first and last) else 1 if first else 3 if last else 2
            self._rec.write(_FRAME.pack(MAGIC, (flag << _LENGTH_BITS) | length))
            self._rec.write(payload[begin:stop])
            self._rec.write(b"\0" * (-length % 4))

    def close(self) -> None:
        if self._rec.closed:
            return
        self._rec.close()
        keys, offsets = np.frombuffer(self._keys, dtype=np.int64), np.frombuffer(self._offsets, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        repeated = keys[order][1:][np.diff(keys[order]) == 0]
        if len(repeated):
            raise ValueError(f"{self.rec_path}: record keys written more than once, e.g. {repeated[:3].tolist()}")
        rows = zip(keys[order].tolist(), offsets[order].tolist())
        self.idx_path.write_text("".join(f"{key}\t{offset}\n" for key, offset in rows), encoding="ascii")

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
