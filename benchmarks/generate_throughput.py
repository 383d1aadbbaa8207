#!/usr/bin/env python
"""Generation throughput on CPU: mtj's KV-cache decoding (fp32, bf16, int8 weights) against transformers'
generate (PyTorch, fp32) and CTranslate2 (float32 and int8, converted from the same HF export with its own
converter), on one random GPT-J.

New tokens per second at batch 1 and batch 8 with 128 new tokens (greedy), each engine measured after a
warm-up in the same run, in alternating rounds whose median is reported (this kind of machine is noisy).
Batch 1 is also given as a fraction of the memory roofline: measured read bandwidth over the bytes of the
weights a token reads (every kernel; the embedding table only by row).
"""

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from common import alternating_rates, model_parser  # noqa: E402

PRESETS = {"small": dict(layers=4, d_model=256, heads=8), "162m": dict(layers=12, d_model=768, heads=12)}
ENGINES = ["mtj-fp32", "mtj-bf16", "mtj-int8", "transformers-fp32", "ct2-float32", "ct2-int8"]
BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "int8": 1, "int4": 0.5}


def read_bandwidth() -> float:
    """Bytes/s of a jitted sum over 1 GiB (read only), best of 5."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(2**28, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


def kernel_params(args) -> int:
    """Parameters a decoded token reads in full: every layer's kernels and the head (not the embedding)."""
    d = args.d_model
    return args.layers * (4 * d * d + 2 * d * 4 * d) + d * args.vocab


def engine(name: str, hf_dir: str, model, args):
    """A function that generates for int prompts [B, T] and checks it made args.new tokens per row."""
    kind, dtype = name.split("-")
    if kind == "mtj":
        import mtj

        lm = mtj.load(hf_dir, dtype="bfloat16" if dtype == "bf16" else "float32",
                      quantize=dtype if dtype in ("int8", "int4") else "none")

        def run(prompts):
            out = lm.generate_tokens(prompts.tolist(), args.new, temperature=0)
            assert all(len(o) == args.new for o in out)
        return run
    if kind == "transformers":
        import torch

        def run(prompts):
            with torch.no_grad():
                model.generate(torch.tensor(prompts), attention_mask=torch.ones_like(torch.tensor(prompts)),
                               max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
        return run
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    out_dir = f"{hf_dir}/ct2-{dtype}"
    TransformersConverter(hf_dir).convert(out_dir, quantization=dtype)
    generator = ctranslate2.Generator(out_dir, device="cpu", compute_type=dtype, intra_threads=args.threads)
    strings = tokenizer(args.vocab).convert_ids_to_tokens(list(range(args.vocab)))  # CTranslate2 takes tokens

    def run(prompts):
        out = generator.generate_batch([[strings[t] for t in row] for row in prompts], max_length=args.new,
                                       min_length=args.new, sampling_topk=1, include_prompt_in_result=False)
        assert all(len(r.sequences_ids[0]) == args.new for r in out)
    return run


def tokenizer(vocab: int):
    """GPT-2's tokenizer (MTJ_ASSETS) with placeholder tokens up to `vocab`: CTranslate2's converter wants one
    the size of the embedding."""
    import transformers

    assets = Path(os.environ.get("MTJ_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
    tok = transformers.GPT2TokenizerFast(vocab=str(assets / "gpt2" / "vocab.json"),
                                         merges=str(assets / "gpt2" / "merges.txt"))
    tok.add_tokens([f"<extra_{i}>" for i in range(vocab - len(tok))])
    return tok


def main() -> None:
    ap = model_parser(__doc__)
    ap.add_argument("--preset", choices=sorted(PRESETS), help="model size (overrides --layers, --d-model, --heads)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {ENGINES} and mtj-int4")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    if args.preset:
        vars(args).update(PRESETS[args.preset])
    names = args.engines.split(",")
    unknown = [n for n in names if n not in ENGINES + ["mtj-int4"]]
    if unknown:
        ap.error(f"unknown engines {unknown}")

    import torch
    import transformers

    import mtj  # noqa: F401  (first: it keeps libtpu, where installed, from probing for TPUs)

    torch.set_num_threads(args.threads)
    cfg = transformers.GPTJConfig(vocab_size=args.vocab, n_positions=512, n_embd=args.d_model, n_layer=args.layers,
                                  n_head=args.heads, rotary_dim=args.d_model // args.heads // 2)
    model = transformers.GPTJForCausalLM(cfg).eval()
    bandwidth = read_bandwidth()
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer(args.vocab).save_pretrained(tmp)
        runs = [engine(name, tmp, model, args) for name in names]
        for batch in map(int, args.batches.split(",")):
            prompts = np.random.RandomState(batch).randint(0, args.vocab, (batch, args.prompt_len))
            for run in runs:
                run(prompts)  # warm-up (and compilation)
            rates = alternating_rates([lambda run=run: run(prompts) for run in runs], batch * args.new, args.rounds)
            table[batch] = [float(np.median(r)) for r in rates]
    params = kernel_params(args)
    print(f"GPT-J {args.layers} layers, d_model {args.d_model}, {args.heads} heads, vocab {args.vocab} "
          f"({params / 1e6:.0f}M parameters read per token), prompt {args.prompt_len}, {args.new} new tokens, greedy; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    batches = list(table)
    print(f"{'engine':18s}" + "".join(f"{f'b{b} tok/s':>11s}" for b in batches) + f"{'b1 of roofline':>16s}")
    for i, name in enumerate(names):
        roofline = bandwidth / (params * BYTES[name.split("-")[1]])
        share = f"{table[1][i] / roofline:15.0%}" if 1 in table else ""
        print(f"{name:18s}" + "".join(f"{table[b][i]:11.0f}" for b in batches) + share)
    for a, b in [("mtj-int8", "ct2-int8"), ("mtj-int8", "mtj-fp32"), ("mtj-bf16", "mtj-fp32"),
                 ("mtj-fp32", "transformers-fp32"), ("mtj-fp32", "ct2-float32")]:
        if a in names and b in names:
            print(f"{a} / {b}: " + ", ".join(f"b{x} {table[x][names.index(a)] / table[x][names.index(b)]:.2f}x"
                                             for x in batches))


if __name__ == "__main__":
    main()
