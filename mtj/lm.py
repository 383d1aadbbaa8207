"""`mtj.load` and the LM handle of SPEC §5."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mtj import cpu_matmul, checkpoint, convert, platforms
from mtj.config import Config
from mtj.decode.draft import check_draft
from mtj.decode.generator import Generator, TokenSink
from mtj.decode.layout import decode_layout
from mtj.decode.stops import RowText
from mtj.evaluate import top_scores
from mtj.model import Params, forward, param_shardings
from mtj.paths import PathLike, local_copy, user_path
from mtj.sharding import make_mesh, named, place
from mtj.tokenizer import Tokenizer, find_tokenizer_files


class LM:
    """A model placed on a mesh, with its config and (optional) tokenizer."""

    def __init__(self, config: Config, params: Params, mesh: Mesh, tokenizer: Tokenizer | None):
        self.config = config
        self.params = params
        self.mesh = mesh
        self.tokenizer = tokenizer
        self._forward = jax.jit(lambda p, t: forward(p, t, config))
        self._top_scores = jax.jit(lambda p, t, targets: top_scores(p, t, targets, config))
        self.generator = Generator(config, params, mesh, tokenizer.eos_id if tokenizer else None)

    def set_params(self, params: Params) -> None:
        """New weights of the same model (training evaluates its current ones), in any Layout; compiled code
        is kept."""
        self.params = params
        self.generator.set_params(params)

    def set_draft(self, draft: LM | None) -> None:
        """Speculative decoding (`generate_tokens(..., speculate=k)`) drafts with `draft`, a smaller model of the same
        vocabulary (GPT-Neo-125M for GPT-J-6B); None: prompt lookup."""
        if draft is not None:
            check_draft(self.config, draft.config)
        self.generator.set_draft(draft and draft.config, draft and draft.params)

    def use_decode_layout(self) -> Params:
        """Hold the weights in their decode layout (`decode_layout`, made once: what the continuous engine
        steps with; scoring and generate_tokens compute the same values from it), and return them. The
        weights are replaced, not copied: the devices hold them once."""
        with jax.set_mesh(self.mesh):
            self.set_params(decode_layout(self.params, self.config))
        return self.params

    def logits(self, tokens: Any) -> np.ndarray:
        """float32 logits [B, T, n_vocab] for int tokens [B, T]."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be a 2-D [batch, time] int array, got shape {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.n_vocab):
            raise ValueError(f"token ids must be in [0, {self.config.n_vocab}), got range [{tokens.min()}, {tokens.max()}]")
        with jax.set_mesh(self.mesh):
            tokens = jax.device_put(jnp.asarray(tokens, jnp.int32), named(self.mesh, ("batch", None)))
            out = self._forward(self.params, tokens)
        return np.asarray(out)[..., : self.config.n_vocab]

    def token_logprobs(self, ids: Sequence[int], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """How likely each of ids[1:] is after the tokens before it: its log-probability [n-1], and the most likely
        tokens' log-probabilities and ids [n-1, k] (k = min(TOP_LOGPROBS, vocabulary), largest first). One
        forward pass over ids[:-1] right-padded to `width` tokens (a causal model never sees the padding), so
        the caller decides how many shapes compile."""
        n = len(ids)
        if not 2 <= n <= width + 1 or width > self.config.seq:
            raise ValueError(f"scoring takes 2 to {width + 1} tokens (width {width}, context {self.config.seq}), got {n}")
        tokens, targets = np.zeros((1, width), np.int32), np.zeros((1, width), np.int32)
        tokens[0, : n - 1], targets[0, : n - 1] = ids[:-1], ids[1:]
        if tokens.max() >= self.config.n_vocab or targets.max() >= self.config.n_vocab or min(ids) < 0:
            raise ValueError(f"token ids must be in [0, {self.config.n_vocab})")
        with jax.set_mesh(self.mesh):
            batch = named(self.mesh, ("batch", None))
            out = self._top_scores(self.params, jax.device_put(tokens, batch), jax.device_put(targets, batch))
        picked, values, top = (np.asarray(a)[0, : n - 1] for a in out)
        real = top[0] < self.config.n_vocab  # (padded vocabulary columns rank last)
        return picked, values[:, real], top[:, real]

    def generate_tokens(self, token_lists: Sequence[Sequence[int]], max_new_tokens: int = 32,
                        temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                        top_p: float | Sequence[float] = 1.0, seed: int | Sequence[int] = 0,
                        on_tokens: TokenSink | None = None, speculate: int = 0, **adjust: Any) -> list[list[int]]:
        """New tokens for each prompt; sampling parameters are scalars or one per prompt; `speculate` k: speculative
        decoding with prompt-lookup drafts of k tokens; `adjust`: repetition_penalty, presence_penalty,
        frequency_penalty and logit_bias ({token: bias}), each one or one per prompt (`Generator.generate_tokens`)."""
        for tokens in token_lists:
            if any(t < 0 or t >= self.config.n_vocab for t in tokens):
                raise ValueError(f"token ids must be in [0, {self.config.n_vocab})")
        return self.generator.generate_tokens(token_lists, max_new_tokens, temperature, top_k, top_p, seed, on_tokens,
                                              speculate, **adjust)

    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 32, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: str | Sequence[str] | None = None) -> list[str]:
        """Completions (new text only), cut before the first stop string."""
        tok = self.require_tokenizer()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        outs = self.generate_tokens(tok.encode_batch(prompts), max_new_tokens, temperature, top_k, top_p, seed)
        return [RowText.of(tok, tok.eos_id, ids, stop).text for ids in outs]

    def decode_new(self, ids: Sequence[int]) -> str:
        """Text of generated tokens, without the end-of-text token."""
        tok = self.require_tokenizer()
        return RowText.of(tok, tok.eos_id, ids).text

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer attached (its directory had no tokenizer files); "
                             "use the token-level calls (logits, generate_tokens) or set 'tokenizer' and re-convert")
        return self.tokenizer


def inference_config(cfg: Config, overrides: dict[str, Any], platform: str | None = None) -> Config:
    """What a loaded model runs with on `platform` (default: JAX's backend). On accelerators the weights are
    held in the compute dtype, unless `param_dtype` is given: decoding reads every weight once per token, so
    fp32 masters would double its memory traffic (and each step would cast them). On CPU they stay in
    param_dtype: XLA:CPU gathers from a bf16 embedding table by converting all of it first, and its bf16
    matmuls convert too."""
    if "param_dtype" in overrides or not platforms.platform(platform).weights_in_compute_dtype:
        return cfg
    return cfg.replace(param_dtype=cfg.dtype)


def load(path: PathLike, mp: int = 1, **overrides: Any) -> LM:
    """Load our checkpoint (model_dir or step dir) or an HF directory onto `mp` devices.

    `overrides` replace config keys, e.g. dtype="float32" or quantize="int8"; the weights' dtype is
    `inference_config`'s.
    """
    path = user_path(path)
    # One replica; on several processes one per process, so that every process holds its part.
    mesh = make_mesh(mp=mp, dp=jax.process_count())
    if convert.is_hf_dir(path):
        with local_copy(path) as local:  # safetensors are memory-mapped: a bucket's directory is downloaded
            cfg = inference_config(convert.config_from_hf(convert.read_hf_config(local), cores_per_replica=mp,
                                                          **overrides), overrides)
            params = place(convert.hf_to_params(convert.HFTensors(local, cfg), cfg), param_shardings(cfg, mesh),
                           cfg.param_dtype)
            tok = find_tokenizer_files(local)
        return _ready(LM(cfg, params, mesh, tok))
    if checkpoint.is_checkpoint(path):
        model = checkpoint.restore_model(path, mesh, lambda cfg: inference_config(cfg, overrides), **overrides)
        return _ready(LM(model.cfg, model.params, mesh, model.tokenizer))
    raise FileNotFoundError(f"{path} is neither an mtj checkpoint (step_N directories) nor a Hugging Face "
                            "model directory (config.json + *.safetensors)")


def _ready(lm: LM) -> LM:
    """A quantized model (config key `quantize`) is quantized once, here, in the layout decoding reads; so
    is a bf16 one on one CPU device, whose kernels `mtj.cpu_matmul` reads as bf16."""
    if lm.config.quantize != "none" or (lm.config.dtype == "bfloat16" and cpu_matmul.enabled(lm.mesh)):
        lm.use_decode_layout()
    return lm
