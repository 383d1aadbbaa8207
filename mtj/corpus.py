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


def repack_orders(n: int, n_repack_epochs: int, seed: int, preserve_order: bool) -> Iterator[list[int]]:
    """Each repack epoch's order of n documents: a new seeded shuffle every epoch, or their own order."""
    rng = random.Random(seed)
    for _ in range(n_repack_epochs):
        order = list(range(n))
        if not preserve_order:
            rng.shuffle(order)
        yield order


def pack(docs: list[np.ndarray], seq: int, n_repack_epochs: int = 1, seed: int = 10,
         preserve_order: bool = False, min_unique_tokens: int = 0) -> np.ndarray:
    """Windows of seq+1 tokens; each repack epoch reshuffles the documents (new boundaries)."""
    out = []
    for order in repack_orders(len(docs), n_repack_epochs, seed, preserve_order):
        stream = np.concatenate([docs[i] for i in order]) if docs else np.zeros(0, np.int32)
        w = windows(stream, seq)
        if min_unique_tokens:
            w = w[[len(np.unique(row)) >= min_unique_tokens for row in w]] if len(w) else w
        out.append(w)
    return np.concatenate(out) if out else np.zeros((0, seq + 1), np.int32)


def example_documents(lines: Iterable[str], name: str, tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Fine-tuning examples, one JSON object per line: {"text"} (all learned), {"prompt", "completion"} (the
    completion learned) or {"messages"} (the assistant's messages learned, through the tokenizer's chat template);
    each as (ids ending with EOS, loss mask)."""
    chat = tokenizer.chat()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
            if "messages" in example:
                if chat is None:
                    raise ValueError("\"messages\" need a chat template, and this tokenizer has none")
                ids, mask = _conversation(example["messages"], chat, tokenizer)
            elif "prompt" in example:
                prompt, completion = tokenizer.encode(example["prompt"]), tokenizer.encode(example["completion"])
                ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
            else:
                ids = tokenizer.encode(example["text"])
                mask = [1] * len(ids)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{name}: line {n} is not a JSON object with \"text\", \"prompt\" and \"completion\", or "
                             f"\"messages\" ({type(e).__name__}: {e})") from None
        yield np.array([*ids, tokenizer.eos_id], np.int32), np.array([*mask, 1], np.int32)


def _conversation(messages: list[dict], chat, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """A conversation's ids and mask: the text each assistant message adds to the rendered conversation is
    learned (each prefix is rendered, so the template's own markup around a message goes with it)."""
    text, learned = "", []
    for i, message in enumerate(messages):
        longer = chat.render(messages[:i + 1], add_generation_prompt=False)
        if not longer.startswith(text):
            raise ValueError("the chat template renders a conversation's start differently once it goes on")
        if message.get("role") == "assistant":
            learned.append((len(text), len(longer)))
        text = longer
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [int(any(a <= start and end <= b for a, b in learned)) for start, end in encoding.offsets]
    return encoding.ids, mask


def pack_examples(examples: list[tuple[np.ndarray, np.ndarray]], seq: int) -> np.ndarray:
    """Packed windows [N, 3, seq + 1] (tokens, segment ids, loss mask): examples one after another, each a segment
    (1, 2, ...), a window closed (its rest padding, segment 0) when the next does not fit; an example longer than a
    window is cut into windows of its own."""
    width, out = seq + 1, []
    window = np.zeros((3, width), np.int32)
    used = segments = 0
    for ids, mask in examples:
        for at in range(0, len(ids), width):
            piece, piece_mask = ids[at:at + width], mask[at:at + width]
            if used + len(piece) > width:
                out.append(window)
                window, used, segments = np.zeros((3, width), np.int32), 0, 0
            segments += 1
            window[0, used:used + len(piece)], window[2, used:used + len(piece)] = piece, piece_mask
            window[1, used:used + len(piece)] = segments
            used += len(piece)
    if used:
        out.append(window)
    return np.stack(out) if out else np.zeros((0, 3, width), np.int32)


def create_tfrecords(inputs: str, name: str, output_dir: PathLike, tokenizer: Tokenizer, seq: int = 2048,
                     normalize_with_ftfy: bool = False, min_unique_tokens: int = 0, n_repack_epochs: int = 1,
                     seed: int = 10, preserve_data_order: bool = False, max_file_sequences: int = 50_000,
                     progress: bool = True, fmt: str = "text") -> epath.Path:
    """Tokenize `inputs` into {name}_{N}.tfrecords files (several for big inputs) and {name}.index. `fmt` "jsonl":
    fine-tuning examples (example_documents) packed several to a record, with segment ids and loss masks."""
    out = user_path(output_dir)
    if fmt == "jsonl":
        if normalize_with_ftfy or min_unique_tokens:
            raise ValueError("--normalize-with-ftfy and --min-unique-tokens are for text corpora, not --format jsonl")
        data = _packed_examples(inputs, tokenizer, seq, n_repack_epochs, seed, preserve_data_order)
    elif fmt == "text":
        data = _windows_of_text(inputs, tokenizer, seq, normalize_with_ftfy, min_unique_tokens, n_repack_epochs, seed,
                                preserve_data_order, progress)
    else:
        raise ValueError(f"--format must be 'text' or 'jsonl', got '{fmt}'")
    if len(data) == 0:
        raise ValueError(f"'{inputs}' yields no window of seq+1={seq + 1} tokens "
                         f"(too little text, or --min-unique-tokens={min_unique_tokens} filtered everything)")
    parts = [data[i:i + max_file_sequences] for i in range(0, len(data), max_file_sequences)]
    out.mkdir(parents=True, exist_ok=True)
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


def _windows_of_text(inputs: str, tokenizer: Tokenizer, seq: int, normalize_with_ftfy: bool, min_unique_tokens: int,
                     n_repack_epochs: int, seed: int, preserve_data_order: bool, progress: bool) -> np.ndarray:
    docs = list(iter_documents(expand_inputs(inputs)))
    if not docs:
        raise ValueError(f"'{inputs}' contains no documents")
    if normalize_with_ftfy:
        try:
            import ftfy
        except ImportError:
            raise ImportError("--normalize-with-ftfy needs the 'ftfy' package: pip install ftfy") from None
        docs = [ftfy.fix_text(d, normalization="NFKC") for d in docs]
    return pack(tokenize_documents(docs, tokenizer, progress=progress), seq, n_repack_epochs, seed,
                preserve_data_order, min_unique_tokens)


def _packed_examples(inputs: str, tokenizer: Tokenizer, seq: int, n_repack_epochs: int, seed: int,
                     preserve_data_order: bool) -> np.ndarray:
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no <|endoftext|> token to end examples")
    examples = []
    for path in expand_inputs(inputs):
        if _kind(path.name) != ".jsonl":
            raise ValueError(f"--format jsonl reads .jsonl files; {path} is not one")
        with path.open("rb") as raw:
            examples += example_documents(io.TextIOWrapper(raw, encoding="utf-8"), str(path), tokenizer)
    if not examples:
        raise ValueError(f"'{inputs}' contains no examples")
    return np.concatenate([pack_examples([examples[i] for i in order], seq)
                           for order in repack_orders(len(examples), n_repack_epochs, seed, preserve_data_order)])
