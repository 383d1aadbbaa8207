#!/usr/bin/env python
"""Generation throughput: mtj's KV-cache decoding vs transformers' generate (PyTorch, CPU), same model and dtype.

New tokens per second at batch 1 and batch 8 with 128 new tokens (greedy), each
measured after a warm-up in the same run, in alternating rounds whose median is
reported (this kind of machine is noisy); ratios printed.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from common import alternating_rates, model_parser  # noqa: E402


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                    help="mtj's inference weights (transformers' stay in --dtype)")
    args = ap.parse_args()

    import torch
    import transformers

    import mtj

    torch.set_num_threads(args.threads)
    torch_dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    cfg = transformers.GPTJConfig(vocab_size=args.vocab, n_positions=512, n_embd=args.d_model, n_layer=args.layers,
                                  n_head=args.heads, rotary_dim=args.d_model // args.heads // 2)
    model = transformers.GPTJForCausalLM(cfg).eval().to(torch_dtype)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        lm = mtj.load(tmp, dtype="float32" if args.dtype == "fp32" else "bfloat16", quantize=args.quantize)
        for batch in (1, 8):
            prompts = np.random.RandomState(batch).randint(0, args.vocab, (batch, args.prompt_len))

            def ours():
                out = lm.generate_tokens(prompts.tolist(), args.new, temperature=0)
                assert all(len(o) == args.new for o in out)

            def theirs():
                with torch.no_grad():
                    model.generate(torch.tensor(prompts), attention_mask=torch.ones_like(torch.tensor(prompts)),
                                   max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)

            ours(), theirs()  # warm-up (and compilation)
            rates = alternating_rates([ours, theirs], batch * args.new, args.rounds)
            rows.append((batch, *(float(np.median(r)) for r in rates)))
    print(f"GPT-J {args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab}, "
          f"prompt {args.prompt_len}, {args.new} new tokens, greedy, {args.dtype}"
          + (f", mtj's weights {args.quantize}" if args.quantize != "none" else ""))
    print(f"{'batch':>5s} {'mtj tok/s':>10s} {'transformers tok/s':>19s} {'ratio':>6s}")
    for batch, ours_rate, their_rate in rows:
        print(f"{batch:5d} {ours_rate:10.0f} {their_rate:19.0f} {ours_rate / their_rate:5.2f}x")


if __name__ == "__main__":
    main()
