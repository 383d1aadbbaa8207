"""Sample from a checkpoint (ours or a Hugging Face directory): one-shot with --prompt, else an interactive loop."""

import argparse
import json
import secrets
import sys
from collections.abc import Callable

import numpy as np

import mtj
from mtj import distributed
from mtj.cli import add_load_options, load_overrides, parser, run
from mtj.decode.penalties import check_penalties
from mtj.decode.sampling import SEED_LIMIT, check_sampling
from mtj.decode.stops import RowText
from mtj.lm import LM
from mtj.paths import user_path


def complete(lm: LM, prompt: str, args: argparse.Namespace, seed: int) -> None:
    """Print the samples of one prompt; a prompt that fills the context raises ValueError."""
    tok, seq = lm.require_tokenizer(), lm.config.seq
    ids = tok.encode(prompt)
    if not ids:
        print("empty prompt: type some text", file=sys.stderr)
        return
    if len(ids) >= seq:
        raise ValueError(f"the prompt has {len(ids)} tokens and fills the model's context of {seq}: shorten it")
    new = min(args.max_new_tokens, seq - len(ids))
    if new < args.max_new_tokens:  # as transformers does: stop at the end of the context, and say so
        print(f"note: {new} new tokens fit after the prompt's {len(ids)} in the context of {seq}; "
              f"generating {new}, not {args.max_new_tokens}", file=sys.stderr)
    n = args.num_samples
    stream = n == 1 and not args.json
    rows = [RowText(tok, tok.eos_id, args.stop, new) for _ in range(n)]  # each ends at EOS or a stop string
    shown = [0]

    def on_tokens(step: int, tokens: np.ndarray) -> np.ndarray:
        for row, token in zip(rows, tokens.tolist()):
            if row.finish_reason is None:
                row.append(token)
        if stream and len(ready := rows[0].ready()) > shown[0]:  # whole characters that cannot begin a stop
            print(ready[shown[0]:], end="", flush=True)
            shown[0] = len(ready)
        return np.array([row.finish_reason is not None for row in rows])

    if stream:
        print(prompt, end="", flush=True)
    lm.generate_tokens([ids] * n, new, args.temperature, args.top_k, args.top_p, [seed + i for i in range(n)], on_tokens,
                       args.speculate, repetition_penalty=args.repetition_penalty,
                       presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                       logit_bias=args.logit_bias)
    for i, row in enumerate(rows):
        row.end()
        text, out = row.text, row.tokens
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "tokens": out, "sample": i, "seed": seed + i}),
                  flush=True)
        elif stream:
            print(text[shown[0]:], flush=True)
        else:
            print(f"--- sample {i}\n{prompt}{text}", flush=True)


def logit_biases(text: str) -> dict[int, float]:
    try:
        return {int(token): float(bias) for token, bias in (pair.split(":") for pair in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID:BIAS pairs separated by commas, e.g. 50256:-100, got '{text}'") \
            from None


def arguments() -> argparse.ArgumentParser:
    ap = parser("mtj-sample", __doc__)
    ap.add_argument("--ckpt", required=True, help="model_dir, step directory, or HF model directory")
    ap.add_argument("--prompt", help="prompt text (omit both --prompt and --prompt-file for an interactive loop)")
    ap.add_argument("--prompt-file", help="read the prompt from this file")
    ap.add_argument("--max-new-tokens", type=int, default=128,
                    help="tokens generated per sample at most (fewer where the context ends first)")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = no nucleus filtering")
    ap.add_argument("--seed", type=int, default=None,
                    help="sampling seed (sample i uses seed + i); default: a random one, printed so a run can be repeated")
    ap.add_argument("--stop", action="append", default=[], help="end a sample before this text (repeatable)")
    ap.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    ap.add_argument("--speculate", type=int, default=0, metavar="K",
                    help="speculative decoding: each step verifies K draft tokens, by default the tokens that followed "
                         "the last 3 (or 2) tokens where they occurred before in the prompt and output; greedy output "
                         "is unchanged, sampled output follows the same distribution")
    ap.add_argument("--draft-ckpt", metavar="CKPT", help="with --speculate: a smaller model of the same tokenizer "
                    "drafts (e.g. GPT-Neo-125M for GPT-J-6B)")
    ap.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                    help="divide a positive logit (multiply a negative one) of a token already in the prompt or "
                         "output by R (transformers' definition; 1 = off)")
    ap.add_argument("--presence-penalty", type=float, default=0.0, help="subtract this from the logit of a token "
                    "the output holds (OpenAI's definition; 0 = off)")
    ap.add_argument("--frequency-penalty", type=float, default=0.0, help="subtract this once per time the output "
                    "holds a token (OpenAI's definition; 0 = off)")
    ap.add_argument("--logit-bias", type=logit_biases, default=None, metavar="ID:BIAS,...",
                    help="add BIAS to token ID's logit (-100 bans it)")
    ap.add_argument("--mp", type=int, default=1, help="tensor-parallel devices")
    add_load_options(ap, "compute dtype, e.g. float32 (default: the checkpoint's)")
    ap.add_argument("--json", action="store_true", help="one JSON object per sample and line")
    distributed.add_arguments(ap)
    return ap


def main() -> None:
    ap = arguments()
    args = ap.parse_args()
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_samples < 1:
        ap.error(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.seed is not None and not 0 <= args.seed <= SEED_LIMIT - args.num_samples:
        ap.error(f"--seed must be in [0, 2^32 - num_samples], got {args.seed}")
    if args.top_k < 0:
        ap.error(f"top_k must be at least 0 (0 = off), got {args.top_k}")
    if not 0 <= args.speculate <= 16 or (args.draft_ckpt and not args.speculate):
        ap.error(f"--speculate must be in [0, 16] (and above 0 with --draft-ckpt), got {args.speculate}")
    try:  # before the (slow) load what the model does not bound; after it top_k and token ids against the vocabulary
        check_sampling(args.temperature, 0, args.top_p, 0, 0)
        check_penalties(args.repetition_penalty, args.presence_penalty, args.frequency_penalty, {}, 0)
    except ValueError as e:
        ap.error(str(e))
    distributed.initialize(args)
    lm = mtj.load(args.ckpt, mp=args.mp, **load_overrides(args))
    try:
        check_sampling(args.temperature, args.top_k, args.top_p, 0, lm.config.n_vocab)
        check_penalties(args.repetition_penalty, args.presence_penalty, args.frequency_penalty, args.logit_bias or {},
                        lm.config.n_vocab)
        if args.draft_ckpt:
            lm.set_draft(mtj.load(args.draft_ckpt, mp=args.mp, **load_overrides(args)))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None

    def seed_for(k: int) -> int:
        """Prompt k's seed: from --seed (the whole session repeats), else a fresh one, printed."""
        if args.seed is not None:
            return (args.seed + k * args.num_samples) % (SEED_LIMIT - args.num_samples + 1)
        seed = secrets.randbelow(SEED_LIMIT - args.num_samples + 1)
        if args.temperature > 0:
            print(f"seed {seed} (--seed {seed} repeats this)", file=sys.stderr, flush=True)
        return seed

    if args.prompt is not None or args.prompt_file:
        try:
            complete(lm, args.prompt if args.prompt is not None else user_path(args.prompt_file).read_text(), args,
                     seed_for(0))
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        return
    interactive(lm, args, seed_for)


def interactive(lm: LM, args: argparse.Namespace, seed_for: Callable[[int], int]) -> None:
    """Sample each line of stdin as a prompt until it ends."""
    if sys.stdin.isatty():
        print("Interactive sampling: type a prompt and press Enter (Ctrl-D to quit).", file=sys.stderr)
    k = 0
    for line in sys.stdin:
        if line.strip():
            try:
                complete(lm, line.rstrip("\n"), args, seed_for(k))
            except ValueError as e:  # this prompt only: the loop goes on
                print(f"error: {e}", file=sys.stderr, flush=True)
            k += 1


def cli() -> None:
    """`mtj-sample` (and `python scripts/sample.py`): a user's mistake is one line on stderr, exit status 1."""
    run(main)


if __name__ == "__main__":
    cli()
