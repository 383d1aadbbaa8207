"""What a person sees of a run: metrics.jsonl, TensorBoard, optional wandb, MFU, a loss curve."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from mtj.config import Config
from mtj.model import count_params

# Dense bf16 peak FLOP/s per JAX device (a TPU v2/v3 device is one core).
PEAK_FLOPS = {"TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12, "NVIDIA A100": 312e12, "NVIDIA H100": 989e12}


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6N for the matmul weights plus the attention scores (PaLM's formula).

    The input embedding is a lookup, not a matmul, so it is left out of N unless it doubles as the LM head.
    """
    n = count_params(cfg) - (0 if cfg.tie_embeddings else cfg.n_vocab * cfg.d_model)
    return 6 * n + 12 * cfg.layers * cfg.n_heads * cfg.head_dim * cfg.seq


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mtj" / "cpu_peak.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_cpu_peak(dtype: str) -> float:
    """Measured matmul FLOP/s of this CPU for the compute dtype (cached per CPU model: it takes a few seconds)."""
    path, key = _cache_path(), f"{_cpu_model()} {os.cpu_count()} cores {dtype}"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if key in cache:
        return cache[key]
    n = 1024
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32), device=jax.devices()[0])
    f(a, a).block_until_ready()
    t, reps = time.perf_counter(), 10
    for _ in range(reps):
        f(a, a).block_until_ready()
    cache[key] = 2 * n**3 * reps / (time.perf_counter() - t)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, path)  # concurrent runs never see a half-written cache
    return cache[key]


def peak_flops(dtype: str) -> float:
    """Peak FLOP/s of all devices of the run."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measure_cpu_peak(dtype)  # the simulated CPU devices share the same cores
    for name, flops in PEAK_FLOPS.items():
        if dev.device_kind.startswith(name):
            return flops * jax.device_count()
    return float("nan")


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl; mirrors to TensorBoard and wandb."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            pass
        if cfg.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.name, config=cfg.to_dict(), resume="allow")
            except ImportError:
                print("wandb_project is set but wandb is not installed; logging to metrics.jsonl and TensorBoard only")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_loss_curve(metrics_path: Path, out: Path) -> None:
    """loss (and validation) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if train:
        ax.plot(*zip(*train), label="train")
    for key in sorted({k for r in rows for k in r if k.startswith("val/")}):
        ax.plot(*zip(*[(r["step"], r[key]) for r in rows if key in r]), "o-", label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
