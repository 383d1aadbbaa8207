"""What a person sees of a run: metrics.jsonl, TensorBoard, optional wandb, MFU, a loss curve."""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from mtj import platforms
from mtj.config import Config
from mtj.model import count_params
from mtj.paths import PathLike, files_under, is_remote, user_path, write_atomic

# Dense bf16 peak FLOP/s per JAX device (a TPU v2/v3 device is one core).
PEAK_FLOPS = {"TPU v2": 22.5e12, "TPU v3": 61.5e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12, "NVIDIA A100": 312e12, "NVIDIA H100": 989e12,
              "NVIDIA H200": 989e12}


def flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: 6N for the matmul weights plus the attention scores (PaLM's formula).

    The input embedding is a lookup, not a matmul, so it is left out of N unless it doubles as the LM head.
    """
    n = count_params(cfg) - (0 if cfg.tie_embeddings else cfg.n_vocab * cfg.d_model)
    return 6 * n + 12 * cfg.layers * cfg.n_heads * cfg.head_dim * cfg.seq


def _cache_path() -> epath.Path:
    return user_path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "mtj" / "cpu_peak.json"


def _cpu_model() -> str:
    try:
        for line in user_path("/proc/cpuinfo").read_text().splitlines():
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
    write_atomic(path, json.dumps(cache))  # concurrent runs never see a half-written cache
    return cache[key]


def peak_flops(dtype: str) -> float:
    """Peak FLOP/s of all devices of the run."""
    dev = jax.devices()[0]
    if platforms.platform(dev.platform).measured_peak:
        return measure_cpu_peak(dtype)  # the simulated CPU devices share the same cores
    for name, flops in PEAK_FLOPS.items():
        if dev.device_kind.startswith(name):
            return flops * jax.device_count()
    return float("nan")


def read_metrics(path: PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a crash or a full disk mid-write) is skipped with a warning."""
    path = user_path(path)
    if not path.is_file():
        return []
    rows = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for n, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}: line {n} is not JSON (only a torn last line is tolerated)") from None
            warnings.warn(f"{path}: skipping its torn last line {n}")
    return rows


class MetricsLog:
    """One JSON object per logged step in `run_dir/metrics.jsonl`, mirrored to TensorBoard and wandb.

    Opening keeps the rows of steps up to `keep_until` (the checkpoint a run resumes from; rows a
    killed run logged past it are dropped), rewritten atomically. A local run_dir is appended to
    line by line. Objects in a bucket cannot be appended to: the log is kept in a local staging
    directory and uploaded whole (metrics.jsonl, the TensorBoard events) by `sync`, which training
    calls at every checkpoint and at the end, so the bucket's log matches its checkpoints.
    """

    def __init__(self, run_dir: PathLike, cfg: Config, enabled: bool = True, keep_until: int = 0):
        self.enabled = enabled
        self.run_dir = user_path(run_dir)
        self.tb = self.wandb = None
        if not enabled:
            return
        self.staging = user_path(tempfile.mkdtemp(prefix="mtj-metrics-")) if is_remote(self.run_dir) else None
        local = self.staging or self.run_dir
        local.mkdir(parents=True, exist_ok=True)
        self.path = local / "metrics.jsonl"
        kept = [r for r in read_metrics(self.run_dir / "metrics.jsonl") if r["step"] <= keep_until]
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.sync()
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(local / "tensorboard"))
        except ImportError:
            print("TensorBoard events need tensorboardX: pip install 'mtj[tensorboard]'; logging to metrics.jsonl")
        if cfg.wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.name, config=cfg.to_dict(), resume="allow")
            except ImportError:
                print("wandb_project is set but wandb is not installed; logging to metrics.jsonl and TensorBoard only")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def sync(self) -> None:
        """Upload the staged log to a bucket run_dir (each file whole); nothing to do for a local one."""
        if not self.enabled or self.staging is None:
            return
        if self.tb is not None:
            self.tb.flush()
        for f in files_under(self.staging):
            write_atomic(self.run_dir / os.fspath(f.relative_to(self.staging)), f.read_bytes())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        self.sync()
        if self.wandb is not None:
            self.wandb.finish()
        if self.enabled and self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


def plot_loss_curve(metrics_path: PathLike, out: PathLike) -> None:
    """loss (and validation) against step, as a PNG (skipped, saying so, without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("loss.png needs matplotlib: pip install 'mtj[plots]'")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
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
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(out, png.getvalue())
