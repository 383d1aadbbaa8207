"""Raw corpora to token windows: the create_tfrecords.py pipeline.

Inputs are .txt, .jsonl (field "text"), .jsonl.zst, .tar.gz archives of those,
a directory (recursively) or a glob. Documents are split on the literal
<|endoftext|>, tokenized in batches (the tokenizers library uses all cores),
each followed by EOS, optionally shuffled, concatenated and cut into seq+1
windows, exactly as the original create_finetune_tfrecords.py did.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from typing import Iterable, Iterator

import numpy as np
from etils import epath
from tqdm import tqdm

from mtj.paths import PathLike, files_under, glob, user_path, write_atomic
from mtj.tfrecord import write_tfrecords
from mtj.tokenizer import EOS, Tokenizer

SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".tar.gz", ".tgz")


def _kind(name: str) -> str | None:
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def expand_inputs(spec: str) -> list[epath.Path]:
    """Files named by a path, a directory (recursively) or a glob, sorted; local or in a bucket."""
    path = user_path(spec)
    if path.is_dir():
        files = [p for p in files_under(path) if _kind(p.name)]
    elif path.is_file():
        files = [path]
    else:
        files = [p for p in glob(spec) if _kind(p.name)]
    if not files:
        raise FileNotFoundError(f"no input found at '{spec}' (expected {', '.join(SUFFIXES)}, a directory or a glob)")
    return files


def _split_text(text: str) -> list[str]:
    return [d for d in text.split(EOS) if d.strip()]


def _jsonl_docs(lines: Iterable[str], name: str) -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{name}: line {n} is not a JSON object with a \"text\" field ({e})") from None


def _zst_lines(raw: io.BufferedIOBase) -> Iterator[str]:
    try:
        import zstandard
    except ImportError:
        raise ImportError("reading .jsonl.zst needs the 'zstandard' package: pip install zstandard") from None
    reader = zstandard.ZstdDecompressor().stream_reader(raw)
    yield from io.TextIOWrapper(reader, encoding="utf-8")


def _docs_from_stream(name: str, raw: io.BufferedIOBase) -> Iterator[str]:
    kind = _kind(name)
    if kind == ".txt":
        yield from _split_text(raw.read().decode("utf-8", errors="replace"))
    elif kind == ".jsonl":
        yield from _jsonl_docs(io.TextIOWrapper(raw, encoding="utf-8"), name)
    elif kind == ".jsonl.zst":
        yield from _jsonl_docs(_zst_lines(raw), name)
    elif kind in (".tar.gz", ".tgz"):
        with tarfile.open(fileobj=raw, mode="r:gz") as tar:
            for member in tar:
                if member.isfile() and _kind(member.name) not in (None, ".tar.gz", ".tgz"):
                    yield from _docs_from_stream(f"{name}:{member.name}", tar.extractfile(member))


def iter_documents(files: Iterable[epath.Path]) -> Iterator[str]:
    for path in files:
        with path.open("rb") as raw:
            yield from _docs_from_stream(str(path), raw)


def tokenize_documents(docs: list[str], tokenizer: Tokenizer, batch: int = 256,
                       progress: bool = False) -> list[np.ndarray]:
    """Each document's ids followed by EOS."""
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no <|endoftext|> token to separate documents")
    out = []
    with tqdm(total=len(docs), desc="tokenizing", unit="doc", disable=not progress) as bar:
        for i in range(0, len(docs), batch):
            for ids in tokenizer.encode_batch(docs[i:i + batch]):
                out.append(np.array([*ids, tokenizer.eos_id], np.int32))
            bar.update(min(batch, len(docs) - i))
    return out


def windows(stream: np.ndarray, seq: int) -> np.ndarray:
    """Cut a token stream into [N, seq + 1] windows, dropping the remainder."""
    n = len(stream) // (seq + 1)
    return stream[: n * (seq + 1)].reshape(n, seq + 1)


def pack(docs: list[np.ndarray], seq: int, n_repack_epochs: int = 1, seed: int = 10,
         preserve_order: bool = False, min_unique_tokens: int = 0) -> np.ndarray:
    """Windows of seq+1 tokens; each repack epoch reshuffles the documents (new boundaries)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_repack_epochs):
        order = list(range(len(docs)))
        if not preserve_order:
            rng.shuffle(order)
        stream = np.concatenate([docs[i] for i in order]) if docs else np.zeros(0, np.int32)
        w = windows(stream, seq)
        if min_unique_tokens:
            w = w[[len(np.unique(row)) >= min_unique_tokens for row in w]] if len(w) else w
        out.append(w)
    return np.concatenate(out) if out else np.zeros((0, seq + 1), np.int32)


def create_tfrecords(inputs: str, name: str, output_dir: PathLike, tokenizer: Tokenizer, seq: int = 2048,
                     normalize_with_ftfy: bool = False, min_unique_tokens: int = 0, n_repack_epochs: int = 1,
                     seed: int = 10, preserve_data_order: bool = False, max_file_sequences: int = 50_000,
                     progress: bool = True) -> epath.Path:
    """Tokenize `inputs` into {name}_{N}.tfrecords files (several for big inputs) and {name}.index."""
    out = user_path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = list(iter_documents(expand_inputs(inputs)))
    if not docs:
        raise ValueError(f"'{inputs}' contains no documents")
    if normalize_with_ftfy:
        try:
            import ftfy
        except ImportError:
            raise ImportError("--normalize-with-ftfy needs the 'ftfy' package: pip install ftfy") from None
        docs = [ftfy.fix_text(d, normalization="NFKC") for d in docs]
    data = pack(tokenize_documents(docs, tokenizer, progress=progress), seq, n_repack_epochs, seed,
                preserve_data_order, min_unique_tokens)
    if len(data) == 0:
        raise ValueError(f"'{inputs}' yields no window of seq+1={seq + 1} tokens "
                         f"(too little text, or --min-unique-tokens={min_unique_tokens} filtered everything)")
    parts = [data[i:i + max_file_sequences] for i in range(0, len(data), max_file_sequences)]
    files = []
    with tqdm(total=len(data), desc="writing", unit="seq", disable=not progress) as bar:
        for k, part in enumerate(parts):
            stem = name if len(parts) == 1 else f"{name}-{k:05d}"
            path = out / f"{stem}_{len(part)}.tfrecords"
            write_tfrecords(path, part)
            files.append(path.name)
            bar.update(len(part))
    index = out / f"{name}.index"
    write_atomic(index, "".join(f + "\n" for f in files))  # entries relative to the index: the folder can move
    return index
