"""Test set-up: 8 simulated CPU devices, offline assets, small random HF models."""

import os
from pathlib import Path

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_assets = Path(__file__).resolve().parents[2] / "shared" / "assets"
if "MTJ_ASSETS" not in os.environ and _assets.is_dir():
    os.environ["MTJ_ASSETS"] = str(_assets)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def assets() -> Path:
    path = os.environ.get("MTJ_ASSETS")
    if not path or not Path(path).is_dir():
        pytest.fail("MTJ_ASSETS must point at the shared assets folder (../shared/assets)")
    return Path(path)


def hf_gptj(path: Path, seed: int = 0, **kw) -> Path:
    """Save a random transformers GPT-J (fp32) to `path` and return it."""
    import torch
    import transformers

    cfg = dict(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
               bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = transformers.GPTJForCausalLM(transformers.GPTJConfig(**cfg)).eval()
    # Random LayerNorm and bias values, so that a mix-up of weights cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def hf_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.fixture
def rng() -> np.random.RandomState:
    return np.random.RandomState(0)
