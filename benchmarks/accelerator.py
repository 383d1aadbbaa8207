#!/usr/bin/env python
"""mtj vs transformers (PyTorch, eager) on this machine's accelerator: training tokens/s and MFU, greedy decoding
tokens/s and its fraction of the memory roofline (weights read once per step), for one GPT-J config.

Presets: `small` (default on CPU: a few seconds per part), `1.3B` and `6B` (GPT-J-6B's shape) for a GPU or
TPU host. Prints the device it ran on; PyTorch uses CUDA when it has it.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

PRESETS = {  # layers, d_model, heads, rotary dims, vocab, seq, train batch
    "small": dict(layers=2, d_model=256, n_heads=8, pe_rotary_dims=16, n_vocab=4096, seq=256, batch=4),
    "1.3B": dict(layers=24, d_model=2048, n_heads=16, pe_rotary_dims=64, n_vocab=50400, seq=2048, batch=8),
    "6B": dict(layers=28, d_model=4096, n_heads=16, pe_rotary_dims=64, n_vocab=50400, seq=2048, batch=8),
}
HBM_BYTES_PER_S = {"NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12, "NVIDIA A100": 2.0e12, "TPU v4": 1.2e12,
                   "TPU v5 lite": 8.2e11, "TPU v5p": 2.76e12}


def timed(step: Callable[[], None], warmup: int, reps: int) -> float:
    """Seconds per call after `warmup` calls (each call must finish its work before returning)."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - start) / reps


def memory_bandwidth() -> float:
    """The device's memory bandwidth in bytes/s: its data sheet's, or measured by copying 512 MB."""
    import jax
    import jax.numpy as jnp

    kind = jax.devices()[0].device_kind
    for name, rate in HBM_BYTES_PER_S.items():
        if kind.startswith(name):
            return rate
    x = jnp.ones(2**27, jnp.float32)
    copy = jax.jit(lambda a: a + 1)
    seconds = timed(lambda: copy(x).block_until_ready(), 2, 5)
    return 2 * x.nbytes / seconds  # read and write


def mtj_parts(args, preset: dict) -> dict:
    import jax

    from mtj.config import Config
    from mtj.lm import LM
    from mtj.metrics import flops_per_token, peak_flops
    from mtj.model import init_params, param_shardings
    from mtj.sharding import make_mesh
    from mtj.train import Trainer

    keys = {k: v for k, v in preset.items() if k != "batch"}
    cfg = Config(**keys, per_replica_batch=preset["batch"], dtype="bfloat16", z_loss=0.0, warmup_steps=1,
                 attention=args.attention,
                 **({"remat": False} if args.remat_policy == "off" else {"remat": True, "remat_policy": args.remat_policy}))
    out = {}
    trainer = Trainer(cfg, make_mesh(mp=1, dp=1))
    state = [trainer.init()]
    batch = np.random.RandomState(0).randint(0, cfg.n_vocab, (1, preset["batch"], cfg.seq + 1)).astype(np.int32)

    def train_step() -> None:
        state[0], metrics = trainer.step(state[0], batch)
        float(metrics["loss"])
    seconds = timed(train_step, 2, args.reps)
    out["train tok/s"] = preset["batch"] * cfg.seq / seconds
    out["train MFU"] = out["train tok/s"] * flops_per_token(cfg) / peak_flops("bfloat16")
    del state[0]

    # Inference holds the weights in the compute dtype, as mtj.load does on accelerators.
    serve_cfg = cfg.replace(param_dtype="bfloat16", remat=False)
    mesh = make_mesh(mp=1, dp=1)
    params = jax.jit(lambda k: init_params(serve_cfg, k), out_shardings=param_shardings(serve_cfg, mesh))(jax.random.key(0))
    weight_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    lm = LM(serve_cfg, params, mesh, None)
    for b in args.decode_batches:
        prompts = np.random.RandomState(b).randint(0, cfg.n_vocab, (b, args.prompt)).tolist()
        seconds = timed(lambda: lm.generate_tokens(prompts, args.new, temperature=0), 1, args.reps)
        out[f"decode b{b} tok/s"] = b * args.new / seconds
    out["roofline b1 tok/s"] = memory_bandwidth() / weight_bytes
    out["weights GB"] = weight_bytes / 1e9
    return out


def torch_parts(args, preset: dict) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    hf = transformers.GPTJConfig(vocab_size=preset["n_vocab"], n_positions=preset["seq"], n_embd=preset["d_model"],
                                 n_layer=preset["layers"], n_head=preset["n_heads"], rotary_dim=preset["pe_rotary_dims"],
                                 bos_token_id=0, eos_token_id=0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    out = {}
    model = transformers.GPTJForCausalLM(hf).to(device).train()
    if args.remat_policy != "off":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    batch = torch.tensor(np.random.RandomState(0).randint(0, preset["n_vocab"], (preset["batch"], preset["seq"])),
                         device=device)

    def train_step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
    out["train tok/s"] = preset["batch"] * preset["seq"] / timed(train_step, 2, args.reps)
    model = model.eval().to(torch.bfloat16)
    for b in args.decode_batches:
        prompts = torch.tensor(np.random.RandomState(b).randint(0, preset["n_vocab"], (b, args.prompt)), device=device)

        def decode() -> None:
            with torch.no_grad():
                model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, pad_token_id=0)
            sync()
        out[f"decode b{b} tok/s"] = b * args.new / timed(decode, 1, args.reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", choices=list(PRESETS), default=None, help="default: small on CPU, 1.3B elsewhere")
    ap.add_argument("--remat-policy", default="full", help="a remat_policy, or off")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="PyTorch threads on CPU")
    ap.add_argument("--no-torch", action="store_true", help="mtj only")
    args = ap.parse_args()

    import jax

    device = jax.devices()[0]
    preset_name = args.preset or ("small" if device.platform == "cpu" else "1.3B")
    preset = PRESETS[preset_name]
    ours = mtj_parts(args, preset)
    theirs = {} if args.no_torch else torch_parts(args, preset)
    print(f"device: {device.device_kind} ({device.platform}, {jax.device_count()} device(s)); preset {preset_name}: "
          f"{preset['layers']} layers, d_model {preset['d_model']}, seq {preset['seq']}, train batch {preset['batch']}, "
          f"bf16 compute, remat {args.remat_policy}, attention {args.attention}; weights {ours['weights GB']:.2f} GB bf16")
    print(f"{'':22s}{'mtj':>12s}{'transformers':>14s}{'ratio':>8s}")
    for key in ["train tok/s", *[f"decode b{b} tok/s" for b in args.decode_batches]]:
        mine, other = ours[key], theirs.get(key, float("nan"))
        print(f"{key:22s}{mine:12.0f}{other:14.0f}{mine / other:7.2f}x")
    print(f"mtj train MFU: {ours['train MFU']:.1%}; batch-1 decode at {ours['decode b1 tok/s'] / ours['roofline b1 tok/s']:.1%} "
          f"of the memory roofline ({ours['roofline b1 tok/s']:.0f} tok/s: bandwidth / bf16 weight bytes)"
          if "decode b1 tok/s" in ours else f"mtj train MFU: {ours['train MFU']:.1%}")


if __name__ == "__main__":
    main()
