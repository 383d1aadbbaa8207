"""Write the record-offsets sidecars of existing TFRecord files (the original trainer's included), local or
gs://, so that training opens them without reading them. Arguments: TFRecord files, .index files (their
files) or folders (their *.tfrecords). Files are indexed in parallel; a file whose sidecar already
describes it is skipped, so a stopped run picks up where it was."""

import concurrent.futures

from tqdm import tqdm

from mtj.cli import parser, run
from mtj.paths import user_path
from mtj.tfrecord import listed_files, write_sidecar


def tfrecord_files(arg: str) -> list:
    """The TFRecord files an argument names: an .index file's, a folder's (or bucket prefix's) *.tfrecords, or
    the file itself."""
    if arg.endswith(".index"):
        return listed_files(arg)
    path = user_path(arg)
    if path.is_dir():
        found = sorted(path.glob("*.tfrecords"))
        if not found:
            raise FileNotFoundError(f"{arg} holds no *.tfrecords files")
        return found
    return [path]


def main() -> None:
    ap = parser("mtj-index", __doc__)
    ap.add_argument("paths", nargs="+", metavar="TFRECORDS_OR_INDEX", help="TFRecord files, .index files, or folders (gs:// prefixes) of *.tfrecords")
    ap.add_argument("--workers", type=int, default=8, help="files indexed at once")
    ap.add_argument("--force", action="store_true", help="rewrite sidecars that already describe their files")
    args = ap.parse_args()
    if args.workers < 1:
        ap.error(f"--workers must be at least 1, got {args.workers}")
    files = list(dict.fromkeys(f for p in args.paths for f in tfrecord_files(p)))
    written = records = 0
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool, \
            tqdm(total=len(files), unit="file", desc="indexing") as bar:
        futures = [pool.submit(write_sidecar, f, args.force) for f in files]
        for future in concurrent.futures.as_completed(futures):
            count = future.result()  # a missing file: FileNotFoundError, one line
            if count is not None:
                written, records = written + 1, records + count
                bar.set_postfix(records=records)
            bar.update(1)
    print(f"wrote {written} sidecars ({records} records); {len(files) - written} files already had theirs")


def cli() -> None:
    """`mtj-index` (and `python scripts/index.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
