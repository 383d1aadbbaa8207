"""TFRecord files of tf.train.Example{"text": Int64List}, read and written without TensorFlow.

Framing of each record (TFRecord): uint64 length, uint32 masked CRC32C of the
length bytes, the data, uint32 masked CRC32C of the data; little endian.
The Example protobuf is encoded and decoded by hand for this one schema;
varints are packed and unpacked with numpy.
"""

from __future__ import annotations

import struct
import warnings
from typing import IO, Iterable

import google_crc32c
import numpy as np

from mtj.paths import PathLike, open_atomic, user_path


class RecordError(ValueError):
    """A malformed TFRecord file; the message names the file and byte offset or record."""


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# --- protobuf: Example{features{feature{"text": Feature{int64_list{value: [...]}}}}} ---

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def pack_varints(values: np.ndarray) -> bytes:
    """Packed protobuf varints of non-negative ints < 2**35, vectorised."""
    v = np.asarray(values, np.int64)
    if v.size and (v.min() < 0 or v.max() >= 1 << 35):
        raise ValueError("token ids must be in [0, 2**35)")
    nbytes = 1 + sum((v >= (1 << (7 * k))).astype(np.int64) for k in range(1, 5))
    out = np.zeros(int(nbytes.sum()), np.uint8)
    starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    for k in range(5):
        has = nbytes > k
        more = nbytes > k + 1
        out[starts[has] + k] = ((v[has] >> (7 * k)) & 0x7F) | np.where(more[has], 0x80, 0)
    return out.tobytes()


def unpack_varints(data: bytes | np.ndarray) -> np.ndarray:
    b = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    ends = np.flatnonzero(b < 0x80)
    if len(ends) == 0 or ends[-1] != len(b) - 1:
        raise ValueError("truncated varint")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    out = np.zeros(len(ends), np.int64)
    for k in range(int(lengths.max())):
        has = lengths > k
        out[has] |= (b[starts[has] + k].astype(np.int64) & 0x7F) << (7 * k)
    return out


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_example(tokens: np.ndarray) -> bytes:
    int64_list = _field(1, pack_varints(tokens))
    feature = _field(3, int64_list)  # Feature.int64_list
    entry = _field(1, b"text") + _field(2, feature)  # map<string, Feature> entry
    return _field(1, _field(1, entry))  # Example.features -> Features.feature


def _fields(buf: memoryview) -> Iterable[tuple[int, int, memoryview]]:
    """(field number, wire type, payload) of length-delimited fields; other wire types are skipped."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 2:
            n, i = _read_varint(buf, i)
            yield number, wire, buf[i:i + n]
            i += n
        elif wire == 0:
            _, i = _read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated protobuf")
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7


def decode_example(data: bytes, feature: str = "text") -> np.ndarray:
    """The int64 values of one feature of a serialized tf.train.Example."""
    buf = memoryview(data)
    for n1, _, features in _fields(buf):
        if n1 != 1:
            continue
        for n2, _, entry in _fields(features):
            if n2 != 1:
                continue
            key, value = None, None
            for n3, _, part in _fields(entry):
                if n3 == 1:
                    key = bytes(part).decode()
                elif n3 == 2:
                    value = part
            if key != feature or value is None:
                continue
            for n4, _, int64_list in _fields(value):
                if n4 == 3:
                    values = [p for n5, _, p in _fields(int64_list) if n5 == 1]
                    return unpack_varints(b"".join(bytes(p) for p in values)) if values else np.zeros(0, np.int64)
            raise ValueError(f"feature '{feature}' is not an Int64List")
    raise ValueError(f"no feature '{feature}' in the Example")


# --- files -----------------------------------------------------------------------

def write_tfrecords(path: PathLike, sequences: Iterable[np.ndarray]) -> int:
    """Write sequences as Examples atomically (aside, then renamed into place); returns the count."""
    count = 0
    with open_atomic(path) as f:
        for seq in sequences:
            data = encode_example(seq)
            header = struct.pack("<Q", len(data))
            f.write(header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data)))
            count += 1
    return count


def scan_offsets(path: PathLike, skip_corrupt: bool = False) -> list[tuple[int, int]]:
    """(offset of data, length) of every record, reading only the 12-byte headers (a file in a bucket is
    streamed through in blocks: memory holds one)."""
    path = user_path(path)
    size = path.stat().length
    offsets = []
    with path.open("rb") as f:
        pos = 0
        while pos < size:
            header = f.read(12)
            error = None
            if len(header) < 12:
                error = f"{path}: truncated record header at byte offset {pos} (file size {size})"
            else:
                length, crc = struct.unpack("<QI", header)
                if crc != masked_crc32c(header[:8]):
                    error = f"{path}: bad length CRC at byte offset {pos}"
                elif pos + 12 + length + 4 > size:
                    error = (f"{path}: record at byte offset {pos} needs {length + 16} bytes but the file "
                             f"ends at {size} (truncated)")
            if error:
                if not skip_corrupt:
                    raise RecordError(error)
                # Without a valid length the rest of the file cannot be framed.
                warnings.warn(f"skipping the rest of the file: {error}")
                break
            offsets.append((pos + 12, length))
            pos += 12 + length + 4
            f.seek(pos)
    return offsets


def check_record(raw: bytes, path: PathLike, offset: int, length: int) -> bytes:
    """The data of a record read as `length` data bytes + 4 CRC bytes from `offset`, verified."""
    if len(raw) < length + 4:
        raise RecordError(f"{path}: truncated record at byte offset {offset - 12}")
    (crc,) = struct.unpack("<I", raw[length:length + 4])
    if crc != masked_crc32c(raw[:length]):
        raise RecordError(f"{path}: bad data CRC in the record at byte offset {offset - 12}")
    return raw[:length]


def read_record(f: IO[bytes], path: PathLike, offset: int, length: int) -> bytes:
    f.seek(offset)
    return check_record(f.read(length + 4), path, offset, length)


def iter_records(path: PathLike) -> Iterable[bytes]:
    path = user_path(path)
    with path.open("rb") as f:
        for offset, length in scan_offsets(path):
            yield read_record(f, path, offset, length)
