"""Sample from a checkpoint (ours or a Hugging Face directory): one-shot with --prompt, else an interactive loop."""

import argparse
import json
import sys

import mtj
from mtj import distributed
from mtj.lm import LM
from mtj.paths import user_path
from mtj.cli import HelpFormatter, run


def complete(lm: LM, prompt: str, args: argparse.Namespace) -> None:
    tok = lm.require_tokenizer()
    ids = tok.encode(prompt)
    if not ids:
        print("empty prompt: type some text", file=sys.stderr)
        return
    n = args.num_samples
    stream = n == 1 and not args.json
    shown, streamed = [0], []

    def on_tokens(step, tokens):  # print text as soon as it decodes cleanly
        streamed.append(int(tokens[0]))
        text = lm.decode_new(streamed)
        if not text.endswith("\ufffd"):
            print(text[shown[0]:], end="", flush=True)
            shown[0] = len(text)

    if stream:
        print(prompt, end="", flush=True)
    outs = lm.generate_tokens([ids] * n, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                              [args.seed + i for i in range(n)], on_tokens if stream else None)
    for i, out in enumerate(outs):
        text = lm.decode_new(out)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": out, "sample": i}), flush=True)
        elif stream:
            print(text[shown[0]:], flush=True)
        else:
            print(f"--- sample {i}\n{prompt}{text}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="mtj-sample", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--ckpt", required=True, help="model_dir, step directory, or HF model directory")
    ap.add_argument("--prompt", help="prompt text (omit both --prompt and --prompt-file for an interactive loop)")
    ap.add_argument("--prompt-file", help="read the prompt from this file")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per sample at most")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filtering")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (sample i uses seed + i)")
    ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    ap.add_argument("--mp", type=int, default=1, help="tensor-parallel devices")
    ap.add_argument("--json", action="store_true", help="one JSON object per sample and line")
    distributed.add_arguments(ap)
    args = ap.parse_args()
    distributed.initialize(args)
    lm = mtj.load(args.ckpt, mp=args.mp)
    if args.prompt is not None or args.prompt_file:
        complete(lm, args.prompt if args.prompt is not None else user_path(args.prompt_file).read_text(), args)
        return
    if sys.stdin.isatty():
        print("Interactive sampling: type a prompt and press Enter (Ctrl-D to quit).", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            complete(lm, line.rstrip("\n"), args)


def cli() -> None:
    """`mtj-sample` (and `python scripts/sample.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
