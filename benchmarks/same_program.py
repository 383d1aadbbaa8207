#!/usr/bin/env python
"""Do two commits compile to the same programs? Compares the optimized HLO of the train step and of greedy
decoding (fp32 and bf16, batch 1 and 8, and through the CPU head screen; the throughput benchmarks' model), of
sampled decoding and of the continuous engine's decode call between two git revisions, with source locations
stripped. Identical programs run at the same speed whatever a noisy machine's timings say, so a refactoring that
should cost nothing can be checked exactly.

    python benchmarks/same_program.py a2ed7b0 HEAD
"""

import argparse
import difflib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def dump(out: Path) -> None:
    """(In a child process, from the revision's tree) write each program's cleaned HLO under `out`."""
    import jax
    import jax.numpy as jnp

    from mtj.config import Config
    from mtj.model import init_params
    from mtj.sharding import make_mesh
    from mtj.train import Trainer

    out.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(mp=1, dp=1)
    sds = jax.ShapeDtypeStruct
    for dtype in ("float32", "bfloat16"):
        cfg = Config(layers=4, d_model=256, n_heads=8, n_vocab=50400, pe_rotary_dims=16, seq=256, per_replica_batch=8,
                     dtype=dtype, z_loss=0.0, warmup_steps=1, scan_layers=False, remat=False)
        trainer = Trainer(cfg, mesh)
        batch = sds((1, 8, cfg.seq + 1), jnp.int32, sharding=trainer.batch_sharding)
        base = (trainer.abstract_base,) if hasattr(trainer, "abstract_base") else ()  # (LoRA's frozen base, since #46)
        with jax.set_mesh(mesh):
            (out / f"train_{dtype}.hlo").write_text(clean(trainer._step.lower(trainer.abstract_state, batch, *base).compile().as_text()))
        params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
        gen = generator().Generator(cfg.replace(seq=512), params, mesh, eos_id=0)
        for b in (1, 8):
            with jax.set_mesh(mesh):
                text = gen._fn(128, streaming=False, greedy=True).lower(params, None, *decode_args(b)).compile().as_text()
            (out / f"decode_{dtype}_b{b}.hlo").write_text(clean(text))
        with jax.set_mesh(mesh):
            text = gen._fn(128, streaming=False, greedy=False).lower(params, None, *decode_args(8)).compile().as_text()
        (out / f"sampled_{dtype}_b8.hlo").write_text(clean(text))
        if dtype == "float32":  # greedy through the CPU head screen (mtj uses it on CPUs with AMX)
            head = jax.eval_shape(lambda p: cpu_decode().screen_head(p, cfg), params)
            with jax.set_mesh(mesh):
                text = gen._fn(128, streaming=False, greedy=True).lower(params, head, *decode_args(1)).compile().as_text()
            (out / "screened_float32_b1.hlo").write_text(clean(text))
        (out / f"slots_{dtype}.hlo").write_text(clean(slot_step(cfg.replace(seq=512), params, mesh)))


def generator():
    """The revision's generator module (mtj/decode/generator.py since 2026-12-06, mtj/generate.py before)."""
    try:
        from mtj.decode import generator
    except ImportError:
        from mtj import generate as generator
    return generator


def cpu_decode():
    """The revision's CPU decode kernels (mtj/decode/cpu.py since 2026-12-06, mtj/cpu_decode.py before)."""
    try:
        from mtj.decode import cpu
    except ImportError:
        from mtj import cpu_decode as cpu
    return cpu


def decode_args(b: int) -> tuple:
    """The generator's arguments past the weights, for the revision's signature (per-row sampling values as
    three arrays, or, since 2026-12-06, one SamplingParams)."""
    import inspect

    import jax
    import jax.numpy as jnp

    if hasattr(generator().Generator, "abstract_args"):
        return generator().Generator.abstract_args(b, 32)
    sds = jax.ShapeDtypeStruct
    sampling = (sds((b,), jnp.float32), sds((b,), jnp.int32), sds((b,), jnp.float32))
    if "sampling" in inspect.signature(generator()._generate).parameters:
        from mtj.decode.sampling import SamplingParams
        sampling = (SamplingParams(*sampling),)
    return (sds((b, 32), jnp.int32), sds((b, 32), bool), sds((), jnp.int32), *sampling, sds((b,), jnp.uint32),
            sds((), jnp.int32))


def slot_step(cfg, params, mesh) -> str:
    """The continuous engine's compiled decode call (8 slots, a 256-token span, sampled), as optimized HLO."""
    import functools

    import jax
    import jax.numpy as jnp

    try:  # the compiled verbs' module (mtj/decode/slots.py since 2026-12-06, mtj/engine.py before)
        from mtj.decode import slots as engine
    except ImportError:
        from mtj import engine
    sds = jax.ShapeDtypeStruct
    S = 8
    with jax.set_mesh(mesh):
        try:  # (mtj/decode/layout.py since 2026-12-06)
            from mtj.decode.layout import decode_layout
        except ImportError:
            decode_layout = engine.decode_weights
        weights = decode_layout(jax.tree.map(jnp.copy, params), cfg)  # (it consumes the layers it cuts)
        try:  # (mtj/decode/cache.py since 2026-12-06)
            from mtj.decode.cache import cache_dtype
        except ImportError:
            cache_dtype = engine.cache_dtype
        row = sds((S, cfg.n_heads, cfg.seq, cfg.head_dim), cache_dtype(cfg))
        sampling = (sds((S,), jnp.float32), sds((S,), jnp.int32), sds((S,), jnp.float32))
        if "sampling" in engine.Slots._fields:
            from mtj.decode.sampling import SamplingParams
            sampling = (SamplingParams(*sampling),)
        slots = engine.Slots(*[sds((S,), t) for t in (jnp.int32, jnp.int32, jnp.int32, bool, jnp.int32)],
                             jax.eval_shape(lambda: jax.random.split(jax.random.key(0), S)), *sampling)
        decode = getattr(engine, "decode", None) or engine._decode
        step = jax.jit(functools.partial(decode, cfg=cfg, span=256, greedy=False))
        return step.lower(weights, [(row, row)] * cfg.layers, slots, sds((), jnp.int32), sds((), jnp.int32)).compile().as_text()


def clean(hlo: str) -> str:
    """The program without what names source files and lines (tables of files, functions and stack frames), and
    with the entry's parameters named by position (JAX names them by their Python argument's path, which a
    renamed argument or record field changes and the program does not)."""
    lines = [line for line in hlo.splitlines()
             if not re.match(r"^\d+ ", line) and not line.startswith(("HloModule", "FileNames", "FunctionNames",
                                                                       "FileLocations", "StackFrames"))]
    text = re.sub(r", (metadata=\{[^}]*\}|stack_frame_id=\d+)", "", "\n".join(lines))
    entry = text[text.index("\nENTRY "):]
    entry = entry[:entry.find("\n}") + 2]
    for name, position in re.findall(r"%([\w.\-]+) = [^\n]*? parameter\((\d+)\)", entry):
        text = re.sub(rf"(?<![\w.\-]){re.escape(name)}(?![\w\-]|\.\d)", f"entry_parameter_{position}", text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("revisions", nargs=2, help="two git revisions of this repository")
    ap.add_argument("--show", type=int, default=0, help="print up to this many differing lines of each program")
    ap.add_argument("--dump", nargs=2, help=argparse.SUPPRESS)  # the child's mode: TREE OUT
    args = ap.parse_args()
    if args.dump:
        sys.path.insert(0, args.dump[0])  # mtj from the revision's tree
        dump(Path(args.dump[1]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        for i, rev in enumerate(args.revisions):
            tree, out = Path(tmp) / f"tree{i}", Path(tmp) / f"hlo{i}"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
            try:
                subprocess.run([sys.executable, __file__, *args.revisions, "--dump", str(tree), str(out)], check=True)
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
            outs.append(out)
        same = True
        for a in sorted(outs[0].glob("*.hlo")):
            b = outs[1] / a.name
            x, y = a.read_text().splitlines(), b.read_text().splitlines()
            diff = [d for d in difflib.unified_diff(x, y, lineterm="", n=0) if d[:1] in "+-" and d[:3] not in ("+++", "---")]
            same &= not diff
            print(f"{a.stem:22s} {'identical' if not diff else f'{len(diff)} lines differ'} ({len(x)} lines)")
            for line in diff[:args.show]:
                print("    " + line[:300])
        print(f"{args.revisions[0]} and {args.revisions[1]}: " + ("the same programs" if same else "different programs"))


if __name__ == "__main__":
    main()
