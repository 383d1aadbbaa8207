"""Serve a checkpoint over HTTP: POST /complete, the OpenAI API (POST /v1/completions and /v1/chat/completions
with SSE streaming, GET /v1/models), POST /tokenize and /detokenize, GET /health and /metrics."""

import argparse
import os
import sys

import mtj
from mtj import access, distributed
from mtj.chat import ChatTemplate
from mtj.paths import user_path
from mtj.serve import Server, request_log
from mtj.cli import add_load_options, load_overrides, parser, run


def int_list(text: str) -> list[int]:
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got '{text}'") from None


def arguments() -> argparse.ArgumentParser:
    ap = parser("mtj-serve", __doc__)
    ap.add_argument("--ckpt", required=True, help="model_dir, step directory, or HF model directory")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on")
    ap.add_argument("--port", type=int, default=5000, help="port to listen on")
    ap.add_argument("--max-batch", type=int, default=8, help="requests decoded together (the continuous engine's slots)")
    ap.add_argument("--engine", choices=["continuous", "static"], default="continuous",
                    help="continuous: --max-batch decode slots that a new request joins at the next step; "
                         "static: what arrived together decodes as one batch, held until its longest row ends")
    ap.add_argument("--prefill-buckets", type=int_list, default=None,
                    metavar="N,N,...", help="prompt lengths the continuous engine compiles prefill for (a prompt is "
                    "padded to the next; the context is always the last); default: powers of two from 16")
    ap.add_argument("--prefix-cache-gb", type=float, default=0.0, metavar="G",
                    help="device memory (GiB per device) that keeps the keys and values of recent prompts, so that a "
                         "prompt sharing a prefix with one of them computes only the rest (continuous engine; "
                         "least recently used prefixes are evicted; outputs are unchanged); default 0: off")
    ap.add_argument("--speculate", type=int, default=0, metavar="K",
                    help="speculative decoding (continuous engine): every step verifies a K-token draft per request, "
                         "the tokens that followed the last 3 (or 2) tokens where they occurred before in its prompt "
                         "and output; greedy output is unchanged, sampled output follows the same distribution. Pays "
                         "where a step is memory-bound (accelerators, few requests) and output copies its input")
    ap.add_argument("--draft-ckpt", metavar="CKPT", help="with --speculate: a smaller model of the same tokenizer drafts "
                    "instead (e.g. GPT-Neo-125M for GPT-J-6B, a small Pythia for a large one)")
    ap.add_argument("--max-queue", type=int, default=64, help="queued rows (prompts x n) before answering 503")
    ap.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for")
    ap.add_argument("--max-connections", type=int, default=256,
                    help="open connections; past it a new one closes the oldest idle one, or gets 503 if all are busy")
    ap.add_argument("--max-connections-per-client", type=int, default=64,
                    help="open connections per client address (past it, as --max-connections; behind a reverse "
                         "proxy every client has its address: set it to --max-connections)")
    ap.add_argument("--head-timeout", type=float, default=10.0,
                    help="seconds a connection may take to send a request head (after opening, or after a response)")
    ap.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    ap.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive (408)")
    ap.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template (as in tokenizer_config.json) for "
                    "/v1/chat/completions; default: the model's own, if its tokenizer has one")
    ap.add_argument("--served-model-name", default=None, help="the model name of the OpenAI API (default: the checkpoint's)")
    ap.add_argument("--mp", type=int, default=1, help="tensor-parallel devices")
    add_load_options(ap, "compute dtype, e.g. float32 (default: the checkpoint's)")
    ap.add_argument("--no-request-log", action="store_true",
                    help="no line per request on stdout (client, path, status, rows, tokens, time; never the text)")
    sharing = ap.add_argument_group("sharing the server (see README: Sharing a server)")
    sharing.add_argument("--api-key", action="append", metavar="KEY",
                         help="a key clients send as 'Authorization: Bearer KEY' (repeatable; every path but /health "
                              f"needs one). Other users of this machine can read a command line: prefer --api-key-file "
                              f"or {access.ENV_KEY}")
    sharing.add_argument("--api-key-file", metavar="FILE", help="API keys, one per line")
    sharing.add_argument("--allow-unauthenticated", action="store_true",
                         help="serve a --host other than loopback without an API key")
    sharing.add_argument("--max-queue-per-key", type=int, default=None, metavar="N",
                         help="rows one key (or, without keys, one client address) may have queued or decoding; past "
                              "it 429 with Retry-After (default: no bound but --max-queue)")
    sharing.add_argument("--ssl-keyfile", metavar="FILE", help="TLS private key (PEM): serve https")
    sharing.add_argument("--ssl-certfile", metavar="FILE", help="TLS certificate chain (PEM)")
    sharing.add_argument("--allowed-origins", metavar="ORIGIN,...", type=lambda s: [o.strip() for o in s.split(",")],
                         help="browser origins allowed to call the API (CORS; '*' for any); default: none")
    distributed.add_arguments(ap)
    return ap


def main() -> None:
    ap = arguments()
    args = ap.parse_args()
    # what can be wrong with the access settings is said before the model loads
    try:
        keys = access.load_keys(args.api_key, args.api_key_file)
        warning = access.check_exposure(args.host, args.port, keys, args.allow_unauthenticated)
    except access.AccessError as e:
        sys.exit(f"error: {e}")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        ap.error("TLS needs both --ssl-keyfile and --ssl-certfile")
    for path in (args.ssl_keyfile, args.ssl_certfile):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (TLS)")
    if args.draft_ckpt and not args.speculate:
        ap.error("--draft-ckpt drafts for speculative decoding: give --speculate K too")
    template = user_path(args.chat_template).read_text() if args.chat_template else None
    try:
        ChatTemplate(template) if template is not None else None  # said before the model loads
    except ValueError as e:
        sys.exit(f"error: --chat-template {args.chat_template}: {e}")
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if not args.no_request_log:
        request_log(sys.stdout)
    distributed.initialize(args)
    lm = mtj.load(args.ckpt, mp=args.mp, **load_overrides(args))
    draft = mtj.load(args.draft_ckpt, mp=args.mp, **load_overrides(args)) if args.draft_ckpt else None
    server = Server(lm, args.host, args.port, args.max_batch, args.max_queue, args.max_tokens,
                    model_name=args.served_model_name or user_path(args.ckpt).name, max_body_bytes=args.max_body_bytes,
                    max_connections=args.max_connections, body_timeout_s=args.body_timeout,
                    engine=args.engine, prefill_buckets=args.prefill_buckets, prefix_cache_gb=args.prefix_cache_gb, speculate=args.speculate,
                    draft=draft, head_timeout_s=args.head_timeout,
                    max_connections_per_client=args.max_connections_per_client, api_keys=keys,
                    max_queue_per_key=args.max_queue_per_key, allowed_origins=args.allowed_origins,
                    ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, chat_template=template)
    server.engine.warm()  # compile the prefill buckets and the decode step before taking traffic
    scheme = "https" if args.ssl_certfile else "http"
    guarded = f", {len(keys)} API key{'s' * (len(keys) > 1)}" if keys else ""
    print(f"serving {args.ckpt} as '{server.model_name}' on {scheme}://{args.host}:{args.port}{guarded}", flush=True)
    server.run()  # until SIGTERM/SIGINT; the requests in flight are answered first
    print("stopped", flush=True)


def cli() -> None:
    """`mtj-serve` (and `python scripts/serve.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
