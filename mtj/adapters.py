"""mtj's LoRA adapters <-> PEFT's adapter files (adapter_config.json + adapter_model.safetensors), driven by the
families' weight tables: an adapted kernel's HF module is the one its weight belongs to.

PEFT keeps A as [rank, in] and B as [out, rank] (torch Linear layout) under
`base_model.model.<module>.lora_{A,B}.weight`, scaled by lora_alpha / r (alpha_pattern and rank_pattern per
module). GPT-NeoX holds q, k and v in one module (query_key_value, its output per head as [q_h, k_h, v_h]):
separate q, k, v adapters become one adapter of rank 3r there (A stacked, B block-diagonal, placed per head),
and an imported one becomes three that share its A.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Iterator

import numpy as np

from mtj import lora
from mtj.config import Config
from mtj.convert import _fuse, _unfuse
from mtj.families import Weight

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class Module:
    """An HF module that adapters may sit on: its name (with "{i}" for the layer) and our kernels in it, in the
    order of its output parts (one, or GPT-NeoX's q, k, v)."""
    hf: str
    kernels: tuple[str, ...]  # our kernel names: q, k, v, o, fc_in, fc_out
    weights: tuple[Weight, ...]

    @property
    def short(self) -> str:  # PEFT's target_modules name
        return self.hf.rsplit(".", 1)[-1]


def modules(cfg: Config) -> list[Module]:
    """The HF modules holding kernels LoRA can adapt, from the family's table."""
    ours = {f"layers.{module}.{kernel}": kernel for module, kernel in lora.TARGETS.values()}
    found: dict[str, list[Weight]] = {}
    for w in cfg.family.weights:
        if w.ours in ours and w.hf.endswith(".weight"):
            found.setdefault(w.hf[: -len(".weight")], []).append(w)
    return [Module(hf, tuple(ours[w.ours] for w in ws), tuple(ws)) for hf, ws in found.items()]


# --- export ----------------------------------------------------------------------------

def to_peft(adapters: dict, cfg: Config) -> Iterator[tuple[str, np.ndarray]]:
    """PEFT's tensors (fp32) of our adapters (`lora.split(params)[1]`, host arrays), one layer and module at a time."""
    layers = adapters["layers"]
    weights = {kernel: (np.asarray(layers[m][f"{kernel}_lora_a"]), np.asarray(layers[m][f"{kernel}_lora_b"]))
               for m, kernel in lora.TARGETS.values() if f"{kernel}_lora_a" in layers.get(m, {})}
    for module in modules(cfg):
        adapted = [k for k in module.kernels if k in weights]
        if not adapted:
            continue
        for i in range(cfg.layers):
            key = PREFIX + module.hf.format(i=i)
            a = np.concatenate([weights[k][0][i].T for k in adapted])  # [rank * len(adapted), in]
            if len(module.kernels) == 1:
                b = weights[adapted[0]][1][i].T
            else:  # block-diagonal over the parts, each part's rows placed per head
                r = cfg.lora_rank
                blocks = []
                for k in module.kernels:
                    block = np.zeros((cfg.n_heads * cfg.head_dim, r * len(adapted)), np.float32)
                    if k in adapted:
                        j = adapted.index(k)
                        block[:, j * r:(j + 1) * r] = weights[k][1][i].T
                    blocks.append(block)
                b = _fuse(blocks, cfg.n_heads)
            yield f"{key}.lora_A.weight", np.ascontiguousarray(a, np.float32)
            yield f"{key}.lora_B.weight", np.ascontiguousarray(b, np.float32)


def peft_config(cfg: Config, base: str) -> dict[str, Any]:
    """adapter_config.json for `to_peft`'s tensors."""
    targets, ranks, alphas = [], {}, {}
    for module in modules(cfg):
        adapted = [k for k in module.kernels if k in lora.adapted_kernels(cfg)]
        if adapted:
            targets.append(module.short)
        if len(adapted) > 1:  # a fused module: rank r per part, the same scale
            ranks[module.short] = cfg.lora_rank * len(adapted)
            alphas[module.short] = cfg.lora_alpha * len(adapted)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "target_modules": sorted(targets),
            "rank_pattern": ranks, "alpha_pattern": alphas, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
            "init_lora_weights": True, "inference_mode": True}


# --- import ----------------------------------------------------------------------------

class PeftError(ValueError):
    """An adapter directory mtj cannot take as it is; the message names what and why."""


def check_peft_config(config: dict, where: str) -> None:
    """Refuse PEFT settings that are not plain LoRA on the projections (what mtj's adapters are)."""
    def refuse(what: str) -> None:
        raise PeftError(f"{where}: {what}; mtj imports plain LoRA adapters (peft_type LORA on the attention and MLP "
                        "projections)")
    if config.get("peft_type") != "LORA":
        refuse(f"peft_type is {config.get('peft_type')!r}")
    if config.get("use_dora"):
        refuse("use_dora is set (DoRA)")
    if config.get("bias", "none") != "none":
        refuse(f"bias is {config['bias']!r} (trained biases)")
    if config.get("modules_to_save"):
        refuse(f"modules_to_save is {config['modules_to_save']} (whole modules trained)")
    if config.get("fan_in_fan_out"):
        refuse("fan_in_fan_out is set")


def _pattern(patterns: dict, name: str, default: float) -> float:
    """PEFT's per-module value: the first pattern matching the module name's tail (peft.utils.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def from_peft(tensors: dict[str, np.ndarray], config: dict, cfg: Config, where: str) -> tuple[Config, dict]:
    """(`cfg` with the lora keys of the adapters, our adapters as stacked fp32 numpy arrays) from PEFT's
    tensors and adapter_config.json. Per-module scales other than ours are folded into B; layers PEFT left
    alone get zero adapters."""
    found: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, float]] = {}  # (kernel, layer) -> (A, B, scale)
    names = {re.compile(re.escape(PREFIX + m.hf).replace(r"\{i\}", r"(\d+)") + r"\.lora_A(?:\.\w+)?\.weight"): m
             for m in modules(cfg)}
    for key in tensors:
        if ".lora_A." not in key:
            continue
        module = next(((m, match) for pattern, m in names.items() if (match := pattern.fullmatch(key))), None)
        if module is None:
            raise PeftError(f"{where}: adapter tensor '{key}' is not on a projection mtj adapts "
                            f"({', '.join(m.hf.format(i='N') for m in modules(cfg))})")
        m, match = module
        i = int(match.group(1))
        a, b = tensors[key], tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or i >= cfg.layers:
            raise PeftError(f"{where}: '{key}' has no lora_B beside it" if b is None else
                            f"{where}: '{key}' is for layer {i}, but the base has {cfg.layers} layers")
        rank, name = a.shape[0], m.hf.format(i=i)
        alpha = _pattern(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        scale = alpha / (np.sqrt(rank) if config.get("use_rslora") else rank)
        for j, kernel in enumerate(m.kernels):
            part = _unfuse(b, m.weights[j], cfg.n_heads) if len(m.kernels) > 1 else b
            found[kernel, i] = (a, part, scale)
    if not found:
        raise PeftError(f"{where} holds no LoRA tensors (lora_A / lora_B weights)")
    rank = max(a.shape[0] for a, _, _ in found.values())
    base_rank = config.get("r", rank)
    ours = cfg.replace(lora_rank=rank, lora_alpha=float(config.get("lora_alpha", 8)) / base_rank * rank,
                       lora_dropout=float(config.get("lora_dropout", 0.0)),
                       lora_targets=[t for t, (_, k) in lora.TARGETS.items() if any(k == kk for kk, _ in found)])
    adapters: dict = {"layers": {}}
    for kernel in sorted({k for k, _ in found}):
        module = next(m for m, k in lora.TARGETS.values() if k == kernel)
        a_stack = b_stack = None
        for i in range(cfg.layers):
            if (kernel, i) not in found:
                continue
            a, b, scale = found[kernel, i]
            if a_stack is None:
                a_stack = np.zeros((cfg.layers, a.shape[1], rank), np.float32)
                b_stack = np.zeros((cfg.layers, rank, b.shape[0]), np.float32)
            a_stack[i, :, : a.shape[0]] = a.T
            b_stack[i, : a.shape[0]] = b.T * (scale / lora.scale(ours))
        adapters["layers"].setdefault(module, {}).update({f"{kernel}_lora_a": a_stack, f"{kernel}_lora_b": b_stack})
    return ours, adapters


def read_config(path: Any) -> dict:
    return json.loads((path / CONFIG_FILE).read_text())
