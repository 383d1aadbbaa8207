"""TFRecord files of tf.train.Example{"text": Int64List}, read and written without TensorFlow.

Framing of each record (TFRecord): uint64 length, uint32 masked CRC32C of the
length bytes, the data, uint32 masked CRC32C of the data; little endian.
The Example protobuf is encoded and decoded by hand for this one schema;
varints are packed and unpacked with numpy.
"""

from __future__ import annotations

import struct
import zlib
import warnings
from typing import IO, Iterable

import google_crc32c
import numpy as np

from mtj.paths import PathLike, is_remote, open_atomic, user_path, write_atomic


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


def encode_example(tokens: np.ndarray, **features: np.ndarray) -> bytes:
    """A tf.train.Example of the "text" feature (and any others, e.g. a packed record's segment_ids and
    loss_mask), each an Int64List."""
    entries = b""
    for name, values in {"text": tokens, **features}.items():
        feature = _field(3, _field(1, pack_varints(values)))  # Feature.int64_list
        entries += _field(1, _field(1, name.encode()) + _field(2, feature))  # map<string, Feature> entry
    return _field(1, entries)  # Example.features -> Features.feature


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


def decode_features(data: bytes) -> dict[str, np.ndarray | None]:
    """Every feature of a serialized tf.train.Example by name: its int64 values, or None for another kind."""
    out: dict[str, np.ndarray | None] = {}
    for n1, _, features in _fields(memoryview(data)):
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
            if key is None or value is None:
                continue
            out[key] = None
            for n4, _, int64_list in _fields(value):
                if n4 == 3:
                    values = [p for n5, _, p in _fields(int64_list) if n5 == 1]
                    out[key] = unpack_varints(b"".join(bytes(p) for p in values)) if values else np.zeros(0, np.int64)
    return out


def decode_example(data: bytes, feature: str = "text") -> np.ndarray:
    """The int64 values of one feature of a serialized tf.train.Example."""
    features = decode_features(data)
    if feature not in features:
        raise ValueError(f"no feature '{feature}' in the Example")
    if features[feature] is None:
        raise ValueError(f"feature '{feature}' is not an Int64List")
    return features[feature]


PACKED_FEATURES = ("segment_ids", "loss_mask")  # a packed record's features beside "text"


# --- files -----------------------------------------------------------------------

HEADER, FOOTER = 12, 4  # a record's length + its CRC before the data; the data's CRC after
SIDECAR = ".offsets"  # beside each file: its records' data lengths, so that opening it reads no record


def sidecar_of(path: PathLike):
    path = user_path(path)
    return path.parent / (path.name + SIDECAR)


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """Each record's data offset in its file, from the data lengths of the records before it."""
    lengths = np.asarray(lengths, np.int64)
    return HEADER + np.concatenate([[0], np.cumsum(lengths + HEADER + FOOTER)[:-1]]).astype(np.int64)


SIDECAR_MAGIC = b"MTJOFFS1"  # format 1
SIDECAR_HEAD = struct.Struct("<8sQQqB")  # magic, file size, records, shortest length, bytes per excess


def sidecar_bytes(lengths: np.ndarray, file_size: int) -> bytes:
    """The sidecar of a file of records with these data lengths: a 33-byte head (SIDECAR_HEAD), then each
    length's excess over the shortest, little endian in the narrowest unsigned type, zlib-compressed (a file's
    records are about equally long: about half a byte per record)."""
    lengths = np.asarray(lengths, np.int64)
    base = int(lengths.min()) if len(lengths) else 0
    excess = lengths - base
    narrowest = next(t for t in ("<u1", "<u2", "<u4", "<u8") if excess.max(initial=0) < 1 << (8 * int(t[2:])))
    head = SIDECAR_HEAD.pack(SIDECAR_MAGIC, file_size, len(lengths), base, int(narrowest[2:]))
    return head + zlib.compress(excess.astype(narrowest).tobytes(), 6)


def parse_sidecar(data: bytes, file_size: int) -> np.ndarray:
    """The data lengths a sidecar holds; ValueError saying why when it is unreadable or does not describe a
    file of `file_size` bytes (a file rewritten or truncated since: its framing would be wrong)."""
    try:
        magic, size, count, base, width = SIDECAR_HEAD.unpack_from(data)
        if magic != SIDECAR_MAGIC:
            raise ValueError(f"it does not start with {SIDECAR_MAGIC!r}")
        lengths = base + np.frombuffer(zlib.decompress(data[SIDECAR_HEAD.size:]), f"<u{width}").astype(np.int64)
    except (struct.error, zlib.error, TypeError, ValueError) as e:  # whatever is wrong, the file is scanned instead
        raise ValueError(f"unreadable ({e})") from None
    if size != file_size:
        raise ValueError(f"it describes a file of {size} bytes, the file has {file_size}")
    if len(lengths) != count or int(lengths.sum()) + (HEADER + FOOTER) * count != file_size or base < 0:
        raise ValueError(f"its {count} records do not add up to the file's {file_size} bytes")
    return lengths


def listed_files(index: PathLike) -> list:
    """The TFRecord files an .index file lists, one per line: as written when absolute (a path or a URL),
    relative to the index's own location otherwise (so a data folder can be copied into a bucket whole)."""
    index = user_path(index)
    if not index.is_file():
        raise FileNotFoundError(f"index file {index} does not exist")
    lines = [line.strip() for line in index.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"index file {index} lists no TFRecord files")
    return [user_path(p) if p.startswith("/") or is_remote(p) else index.parent / p for p in lines]


def write_tfrecords(path: PathLike, sequences: Iterable[np.ndarray]) -> int:
    """Write sequences as Examples atomically (aside, then renamed into place), then the file's sidecar;
    returns the count. A packed sequence [3, seq + 1] (tokens, segment ids, loss mask) adds the "segment_ids"
    and "loss_mask" features."""
    lengths = []
    with open_atomic(path) as f:
        for seq in sequences:
            data = encode_example(seq) if seq.ndim == 1 else encode_example(seq[0], segment_ids=seq[1], loss_mask=seq[2])
            header = struct.pack("<Q", len(data))
            f.write(header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data)))
            lengths.append(len(data))
    write_atomic(sidecar_of(path), sidecar_bytes(np.array(lengths, np.int64),
                                                 sum(lengths) + (HEADER + FOOTER) * len(lengths)))
    return len(lengths)


def scan_lengths(path: PathLike, skip_corrupt: bool = False) -> np.ndarray:
    """The data length of every record, found by reading only the 12-byte headers (a file in a bucket is
    streamed through in blocks: memory holds one)."""
    path = user_path(path)
    size = path.stat().length
    lengths = []
    with path.open("rb") as f:
        pos = 0
        while pos < size:
            header = f.read(HEADER)
            error = None
            if len(header) < HEADER:
                error = f"{path}: truncated record header at byte offset {pos} (file size {size})"
            else:
                length, crc = struct.unpack("<QI", header)
                if crc != masked_crc32c(header[:8]):
                    error = f"{path}: bad length CRC at byte offset {pos}"
                elif pos + HEADER + length + FOOTER > size:
                    error = (f"{path}: record at byte offset {pos} needs {length + 16} bytes but the file "
                             f"ends at {size} (truncated)")
            if error:
                if not skip_corrupt:
                    raise RecordError(error)
                # Without a valid length the rest of the file cannot be framed.
                warnings.warn(f"skipping the rest of the file: {error}")
                break
            lengths.append(length)
            pos += HEADER + length + FOOTER
            f.seek(pos)
    return np.array(lengths, np.int64)


def check_record(raw: bytes, path: PathLike, offset: int, length: int) -> bytes:
    """The data of a record read whole (header, data, CRC) from `offset - 12`, verified: a header that does
    not frame `length` bytes means the offsets are not this file's (a stale sidecar)."""
    where = f"{path}: the record at byte offset {offset - HEADER}"
    if len(raw) < HEADER + length + FOOTER:
        raise RecordError(f"{where} is truncated")
    (found,) = struct.unpack("<Q", raw[:8])
    if found != length or struct.unpack("<I", raw[8:HEADER])[0] != masked_crc32c(raw[:8]):
        raise RecordError(f"{where} is not framed as its offsets say: the file changed after they were taken (from "
                          f"its sidecar {sidecar_of(path).name}, or a scan when it was opened). If it was rewritten, "
                          "run mtj-index on it")
    data = raw[HEADER:HEADER + length]
    if struct.unpack("<I", raw[HEADER + length:HEADER + length + FOOTER])[0] != masked_crc32c(data):
        raise RecordError(f"{path}: bad data CRC in the record at byte offset {offset - HEADER}")
    return data


def read_record(f: IO[bytes], path: PathLike, offset: int, length: int) -> bytes:
    f.seek(offset - HEADER)
    return check_record(f.read(HEADER + length + FOOTER), path, offset, length)


def iter_records(path: PathLike) -> Iterable[bytes]:
    path = user_path(path)
    lengths = scan_lengths(path)
    with path.open("rb") as f:
        for offset, length in zip(offsets_of(lengths).tolist(), lengths.tolist()):
            yield read_record(f, path, offset, length)


def write_sidecar(path: PathLike, force: bool = False) -> int | None:
    """Write a TFRecord file's sidecar from a scan of its headers; the record count, or None when the
    sidecar there already describes the file (and not `force`): so a stopped run of mtj-index resumes."""
    path = user_path(path)
    try:
        size = path.stat().length
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such TFRecord file") from None
    sidecar = sidecar_of(path)
    if not force:
        try:
            parse_sidecar(sidecar.read_bytes(), size)
            return None
        except (FileNotFoundError, ValueError):
            pass
    lengths = scan_lengths(path)
    write_atomic(sidecar, sidecar_bytes(lengths, size))
    return len(lengths)
