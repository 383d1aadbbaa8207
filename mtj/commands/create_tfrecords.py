"""Tokenize a corpus into TFRecords in the original Mesh Transformer JAX format, plus an .index file."""


from mtj.corpus import create_tfrecords
from mtj.tokenizer import load_tokenizer
from mtj.cli import parser, run


def main() -> None:
    ap = parser("mtj-create-tfrecords", __doc__)
    ap.add_argument("input", help=".txt/.jsonl/.jsonl.zst/.tar.gz file, a directory, or a glob")
    ap.add_argument("name", help="output name: NAME_N.tfrecords and NAME.index")
    ap.add_argument("--output-dir", required=True, help="folder (or gs:// URL) for the .tfrecords files and NAME.index")
    ap.add_argument("--tokenizer", default="gpt2", help="tokenizer.json, a vocab.json+merges.txt dir, or gpt2 / gpt-neox-20b")
    ap.add_argument("--seq", type=int, default=2048, help="sequence length; records hold seq+1 tokens")
    ap.add_argument("--format", choices=["text", "jsonl"], default="text",
                    help="text: documents concatenated and cut into windows (the original's records); jsonl: "
                         "fine-tuning examples ({\"text\"}, {\"prompt\", \"completion\"} or {\"messages\"} per line) "
                         "packed several to a record, with segment_ids and loss_mask features (only completions and "
                         "assistant messages are learned)")
    ap.add_argument("--normalize-with-ftfy", action="store_true", help="fix mojibake and NFKC-normalize with ftfy")
    ap.add_argument("--min-unique-tokens", type=int, default=0, help="drop sequences with fewer unique tokens")
    ap.add_argument("--n-repack-epochs", type=int, default=1, help="repeat the data, reshuffled, this many times")
    ap.add_argument("--seed", type=int, default=10, help="document shuffle seed")
    ap.add_argument("--preserve-data-order", action="store_true", help="do not shuffle documents")
    ap.add_argument("--max-file-sequences", type=int, default=50_000, help="sequences per .tfrecords file")
    args = ap.parse_args()
    if args.seq < 1 or args.n_repack_epochs < 1:
        ap.error("--seq and --n-repack-epochs must be positive")
    index = create_tfrecords(args.input, args.name, args.output_dir, load_tokenizer(args.tokenizer), seq=args.seq,
                             normalize_with_ftfy=args.normalize_with_ftfy, min_unique_tokens=args.min_unique_tokens,
                             n_repack_epochs=args.n_repack_epochs, seed=args.seed,
                             preserve_data_order=args.preserve_data_order, max_file_sequences=args.max_file_sequences,
                             fmt=args.format)
    print(f"wrote {index}")


def cli() -> None:
    """`mtj-create-tfrecords` (and `python scripts/create_tfrecords.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
