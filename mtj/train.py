"""The training loop: one compiled, sharded step; validation; checkpoints; exact resume."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mtj import checkpoint, convert, data, harness, lock, lora, quantize
from mtj.checkpoint import CheckpointError
from mtj.config import Config, ConfigError
from mtj.data import Loader, StreamLoader
from mtj.metrics import MetricsLog, flops_per_token, peak_flops, plot_loss_curve, read_metrics
from mtj.loss import head_cross_entropy
from mtj.model import Params, count_params, hidden, init_params, output_head, param_shardings
from mtj.optim import optimizer, schedule
from mtj.paths import PathLike, user_path
from mtj.sharding import make_mesh
from mtj.tokenizer import Tokenizer, load_tokenizer

State = dict[str, Any]  # {"params", "opt_state", "step"}; params: what is trained (with LoRA, the adapters)


def loss_fn(params: Params, batch: jax.Array, cfg: Config, segment_ids: jax.Array | None = None,
            loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(cross entropy + z-loss, cross entropy) of next-token prediction, in fp32, over windows batch [B, T+1].
    Packed documents: `segment_ids` [B, T+1] (each token's document, 0 for padding) keep attention and positions
    within a document, and a target counts only in its input's document; `loss_mask` [B, T+1] (1: learned,
    0: e.g. a prompt) counts only the targets it marks. The means are over the targets that count."""
    if batch.ndim == 3:  # a packed batch [B, 3, T+1] (mtj.data): tokens, segment ids, loss mask
        batch, segment_ids, loss_mask = batch[:, 0], batch[:, 1], batch[:, 2]
    x = hidden(params, batch[:, :-1], cfg, None if segment_ids is None else segment_ids[:, :-1])
    kernel, bias = output_head(params, cfg)
    weights = None if segment_ids is None and loss_mask is None else counted_targets(segment_ids, loss_mask).reshape(-1)
    return head_cross_entropy(x.reshape(-1, x.shape[-1]), kernel, bias, batch[:, 1:].reshape(-1), cfg.z_loss, weights)


def counted_targets(segment_ids: jax.Array | None, loss_mask: jax.Array | None) -> jax.Array:
    """[B, T] bool: the targets that count (in their input's document, marked by the mask)."""
    rows = segment_ids if segment_ids is not None else loss_mask
    counted = jnp.ones(rows[:, 1:].shape, bool)
    if segment_ids is not None:
        counted &= (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    if loss_mask is not None:
        counted &= loss_mask[:, 1:] != 0
    return counted


def opt_state_shardings(opt_shape: Any, param_shardings: Params, mesh: Mesh) -> Any:
    """Optimizer moments shard like the parameters; scalars (counts) are replicated."""
    params_def = jax.tree.structure(param_shardings)
    replicated = NamedSharding(mesh, P())

    def is_param_tree(node: Any) -> bool:
        return jax.tree.structure(node) == params_def

    return jax.tree.map(lambda node: param_shardings if is_param_tree(node) else replicated, opt_shape,
                        is_leaf=is_param_tree)


def frozen_base(cfg: Config, mesh: Mesh) -> Params:
    """The abstract frozen base of LoRA training (with shardings): the compute dtype, its layers' kernels
    quantized when `base_quant` says so (QLoRA)."""
    abstract = checkpoint.abstract_params(lora.base_config(cfg).replace(param_dtype=cfg.dtype), mesh)
    if cfg.base_quant == "none":
        return abstract
    return quantize.abstract_weights(abstract, cfg.base_quant, quantize.BLOCK_KERNELS)


class Trainer:
    """Holds the mesh, shardings and compiled steps of one run configuration. With LoRA (`lora_rank`) the
    state's params are the adapters alone; the frozen base is `base` (`set_base`), an argument of the steps."""

    def __init__(self, cfg: Config, mesh: Mesh | None = None):
        self.cfg = cfg
        self.mesh = mesh or make_mesh(mp=cfg.mp)
        self.dp = self.mesh.shape["dp"]
        self.opt = optimizer(cfg)
        self.lr = schedule(cfg)
        param_sh = param_shardings(cfg, self.mesh)
        abstract = checkpoint.abstract_params(cfg, self.mesh)
        self.base: Params = {}
        self.base_record: dict | None = None  # (LoRA) the base's checkpoint and fingerprint, for the adapters' meta
        self.abstract_base: Params = {}
        if lora.enabled(cfg):
            param_sh, abstract = lora.split(param_sh)[1], lora.split(abstract)[1]
            self.abstract_base = frozen_base(cfg, self.mesh)
        base_sh = jax.tree.map(lambda a: a.sharding, self.abstract_base)
        opt_shape = jax.eval_shape(self.opt.init, abstract)
        self.state_shardings: State = {
            "params": param_sh,
            "opt_state": opt_state_shardings(opt_shape, param_sh, self.mesh),
            "step": NamedSharding(self.mesh, P()),
        }
        self.abstract_state: State = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            {"params": abstract, "opt_state": opt_shape, "step": jax.ShapeDtypeStruct((), jnp.int32)},
            self.state_shardings)
        self.batch_sharding = NamedSharding(self.mesh, P(None, "dp", None))
        self.global_batch = cfg.per_replica_batch * self.dp
        replicated = NamedSharding(self.mesh, P())
        self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_sharding, base_sh),
                             out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self._eval = jax.jit(self._eval_step, in_shardings=(param_sh, self.batch_sharding, base_sh),
                             out_shardings=replicated)
        self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self._merge = jax.jit(lambda base, adapters: lora.merged(lora.combine(base, adapters), cfg))

    # --- compiled functions ---------------------------------------------------
    def _init_state(self, key: jax.Array) -> State:
        params = init_params(self.cfg, key)
        if lora.enabled(self.cfg):  # (the base's draws are dead code here, left out by the compiler)
            params = lora.split(params)[1]
        return {"params": params, "opt_state": self.opt.init(params), "step": jnp.zeros((), jnp.int32)}

    def gradients(self, params: Params, batch: jax.Array, base: Params | None = None,
                  dropout_key: jax.Array | None = None) -> tuple[Params, jax.Array]:
        """Mean gradient (fp32) of `params` and cross entropy over the micro-batches batch[0..gas-1] (a scan,
        accumulating in grad_accum_dtype); with LoRA, `params` are the adapters on the frozen `base`, their
        inputs dropped out by masks drawn from `dropout_key` (one key per micro-batch)."""
        def loss(trained: Params, mb: jax.Array, key: jax.Array | None) -> tuple[jax.Array, jax.Array]:
            with lora.dropout(key, self.cfg.lora_dropout):
                return loss_fn(lora.combine(base or {}, trained), mb, self.cfg)

        grad_fn = jax.value_and_grad(loss, has_aux=True)
        keys = None if dropout_key is None else jax.random.split(dropout_key, batch.shape[0])
        if batch.shape[0] == 1:  # one micro-batch: no accumulator to fill with zeros and add into
            (_, ce), grads = grad_fn(params, batch[0], None if keys is None else keys[0])
            return jax.tree.map(lambda g: g.astype(jnp.float32), grads), ce

        acc_dtype = jnp.dtype(self.cfg.grad_accum_dtype)

        def micro(acc: tuple, xs: tuple) -> tuple[tuple, None]:
            (_, ce), grads = grad_fn(params, *xs)
            grads = jax.tree.map(lambda g: g.astype(acc_dtype), grads)
            return jax.tree.map(jnp.add, acc, (grads, ce)), None

        zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype), params), jnp.zeros((), jnp.float32))
        (grads, ce), _ = jax.lax.scan(micro, zeros, (batch, keys))
        n = batch.shape[0]
        return jax.tree.map(lambda g: g.astype(jnp.float32) / n, grads), ce / n

    def _train_step(self, state: State, batch: jax.Array, base: Params) -> tuple[State, dict]:
        params = state["params"]
        dropout_key = None  # (LoRA's dropout: new masks each step, the same again on a resumed run)
        if self.cfg.lora_rank and self.cfg.lora_dropout:
            dropout_key = jax.random.fold_in(jax.random.key(self.cfg.seed), state["step"])
        grads, loss = self.gradients(params, batch, base, dropout_key)  # gradient accumulation inside one step
        updates, opt_state = self.opt.update(grads, state["opt_state"], params)
        lr = self.lr(state["step"])
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr}
        if batch.ndim == 4:  # packed: the targets learned (useful tokens)
            metrics["learned_tokens"] = jnp.sum(counted_targets(batch[:, :, 1].reshape(-1, batch.shape[-1]),
                                                                batch[:, :, 2].reshape(-1, batch.shape[-1])))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    def _eval_step(self, params: Params, batch: jax.Array, base: Params) -> jax.Array:
        params = lora.combine(base, params)
        return jnp.mean(jax.vmap(lambda mb: loss_fn(params, mb, self.cfg)[1])(batch))

    # --- host-side API ---------------------------------------------------------
    def init(self, seed: int | None = None) -> State:
        with jax.set_mesh(self.mesh):
            return self._init(jax.random.key(self.cfg.seed if seed is None else seed))

    def global_array(self, local: np.ndarray) -> jax.Array:
        shape = (local.shape[0], self.global_batch, *local.shape[2:])
        return jax.make_array_from_process_local_data(self.batch_sharding, local, shape)

    def set_base(self, params: Params, record: dict) -> None:
        """(LoRA) The frozen base (as `checkpoint.restore_lora_base` gives it, in the compute dtype), quantized
        as `base_quant` says, one array at a time, each original deleted (`params` is consumed); `record` names
        it in the adapters' checkpoints."""
        if self.cfg.base_quant != "none":
            with jax.set_mesh(self.mesh):
                params = quantize.quantize_weights(params, self.cfg.base_quant, quantize.BLOCK_KERNELS, consume=True)
        self.base = jax.device_put(params, jax.tree.map(lambda a: a.sharding, self.abstract_base))
        self.base_record = record

    def merged(self, params: Params) -> Params:
        """The whole model's weights: with LoRA, the adapters folded into the base (compute dtype)."""
        if not lora.enabled(self.cfg):
            return params
        with jax.set_mesh(self.mesh):
            return self._merge(self.base, params)

    def step(self, state: State, local_batch: np.ndarray) -> tuple[State, dict]:
        with jax.set_mesh(self.mesh):
            return self._step(state, self.global_array(local_batch), self.base)

    def evaluate(self, params: Params, loader: Loader, batches: int) -> float:
        loader.reset()
        with jax.set_mesh(self.mesh):
            losses = [self._eval(params, self.global_array(next(loader)), self.base) for _ in range(batches)]
        return float(np.mean([float(x) for x in losses]))

    def loader(self, spec: str | dict[str, float], tokenizer: Tokenizer, shuffle: bool = True) -> Loader | StreamLoader:
        return data.loader(spec, self.cfg.seq, tokenizer, self.cfg.gradient_accumulation_steps, self.global_batch,
                           seed=self.cfg.seed, shuffle=shuffle, process_index=jax.process_index(),
                           process_count=jax.process_count(), skip_corrupt=self.cfg.skip_corrupt_records,
                           n_vocab=self.cfg.n_vocab)


def run_dir(cfg: Config) -> str:
    return f"gs://{cfg.bucket}/{cfg.model_dir}" if cfg.bucket else cfg.model_dir


def _restore_state(trainer: Trainer, ckpt: PathLike, with_opt: bool, resume: bool) -> tuple[State, dict]:
    """The state and meta of the newest step of `ckpt` that restores. Resuming takes its step,
    optimizer state and data position (all required), and sets unrestorable newer steps aside
    (the run will write those step numbers again); fine-tuning takes its weights at step 0."""
    abstract = trainer.abstract_state

    def restore(step_dir: epath.Path) -> dict:
        checkpoint.refuse_quantized(step_dir, "training")
        checkpoint.check_same_model(trainer.cfg, checkpoint.read_config(step_dir), str(step_dir))
        _check_lora_run(trainer.cfg, checkpoint.lora_base_of(step_dir), step_dir)
        items = {"params": ocp.args.StandardRestore(abstract["params"]), "meta": ocp.args.JsonRestore()}
        if resume or (with_opt and (step_dir / "opt_state").is_dir()):
            items["opt_state"] = ocp.args.StandardRestore(abstract["opt_state"])
        restored = checkpoint.restore_items(step_dir, **items)
        if resume and "data" not in restored["meta"]:
            raise CheckpointError(f"{step_dir}/meta has no data position")
        return restored

    restored, step_dir = checkpoint.restore_newest(ckpt, restore, set_aside=resume)
    if (record := restored["meta"].get("lora_base")) is not None:
        trainer.set_base(checkpoint.restore_recorded_base(record, trainer.cfg, trainer.mesh, trainer.cfg.dtype,
                                                          str(step_dir)), record)
    with jax.set_mesh(trainer.mesh):
        opt_state = restored["opt_state"] if "opt_state" in restored else \
            jax.jit(trainer.opt.init, out_shardings=trainer.state_shardings["opt_state"])(restored["params"])
    step = checkpoint.step_number(step_dir) if resume else 0
    step_arr = jax.device_put(jnp.asarray(step, jnp.int32), trainer.state_shardings["step"])
    return {"params": restored["params"], "opt_state": opt_state, "step": step_arr}, restored["meta"]


def _check_lora_run(cfg: Config, record: dict | None, step_dir: epath.Path) -> None:
    """A run resumes as it was: adapters (lora_rank) from adapters, a whole model from a whole model."""
    if lora.enabled(cfg) and record is None:
        raise ConfigError(f"{step_dir} holds a whole model, not LoRA adapters, but lora_rank={cfg.lora_rank}: "
                          "to train adapters on it, give it as --tune-model-path to a new model_dir")
    if not lora.enabled(cfg) and record is not None:
        raise ConfigError(f"{step_dir} holds LoRA adapters (on {record['path']}): resume it with the run's lora_rank "
                          "and lora_targets (see its config.json)")


def _harness(cfg: Config, trainer: Trainer, params: Params, tokenizer: Tokenizer, lead: bool) -> Any:
    """The lm-evaluation-harness evaluator of eval_harness_tasks, or None (none set, no validation,
    or the harness not installed: reported once)."""
    if not (cfg.val_every and cfg.eval_harness_tasks):
        return None
    if harness.MISSING is not None:
        if lead:
            print(f"eval_harness_tasks needs lm-evaluation-harness ({harness.MISSING}): pip install 'mtj[eval]'; "
                  "training goes on without it")
        return None
    return harness.TrainingEval(lora.base_config(cfg), trainer.merged(params), trainer.mesh, tokenizer, report=lead)


class StopRequests:
    """SIGTERM (a preempted VM's notice) and SIGINT while training: the first asks the run to stop after the
    current step, checkpointed; later ones are acknowledged and do not interrupt the save.

    On several processes a signal may reach any of them: every process shares its flags after every step
    (one all-gather), so all stop after the same step. (JAX's own preemption service is off, see
    `mtj.distributed`.)"""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous: dict[int, Any] = {}
        self.finishing = False

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # (signals can only be caught there)
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            if handler is not None:  # (None: a handler not set from Python, which cannot be put back)
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.finishing:
            print(f"{name}: the run is finishing; its last step is being saved", file=sys.stderr, flush=True)
        elif self.signal is None:
            self.signal = name
            print(f"{name}: stopping after this step, with a checkpoint", file=sys.stderr, flush=True)
        else:
            print(f"{name} again: the checkpoint is being saved and will be complete", file=sys.stderr, flush=True)

    def agreed(self, lock_lost: bool = False) -> tuple[bool, bool]:
        """Whether any process was asked to stop, and whether the run's lock was taken. On several processes
        a collective: every process calls it after every step and all get the same answer."""
        flags = np.array([self.signal is not None, lock_lost])
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(flags).reshape(-1, 2).any(axis=0)
        return bool(flags[0]), bool(flags[1])


class TrainHooks(NamedTuple):
    """Calls from points of the training loop (the crash tests kill the process there: tests/kill_train.py)."""

    after_step: Callable[[int, Callable[[], None]], None] | None = None  # (step, wait for checkpoint writes)
    after_save: Callable[[int], None] | None = None  # a checkpoint of the step is being written


def train(cfg: Config, tune_model_path: str | None = None, fresh_opt: bool = False, mesh: Mesh | None = None,
          progress: bool = True, takeover: bool = False, hooks: TrainHooks = TrainHooks()) -> State:
    """Train to cfg.total_steps, resuming from the latest checkpoint in model_dir if there is one. SIGTERM or
    SIGINT stops it after the current step, with a checkpoint of that step. The run holds model_dir's writer
    lock (`mtj.lock`); `takeover` takes it from a run that holds it."""
    with StopRequests() as stops, lock.hold(run_dir(cfg), takeover=takeover) as writer:
        return _train(cfg, tune_model_path, fresh_opt, mesh, progress, stops, writer, hooks)


def _train(cfg: Config, tune_model_path: str | None, fresh_opt: bool, mesh: Mesh | None, progress: bool,
           stops: StopRequests, writer: lock.WriterLock | None, hooks: TrainHooks) -> State:
    trainer = Trainer(cfg, mesh)
    lead = jax.process_index() == 0
    out = user_path(run_dir(cfg))
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.model_type)
    loader = trainer.loader(cfg.train_set, tokenizer)
    val = {name: trainer.loader(spec, tokenizer, shuffle=False) for name, spec in cfg.val_set.items()} \
        if cfg.val_every and cfg.val_batches else {}

    state, resumed = _starting_state(trainer, loader, out, tune_model_path, fresh_opt, lead)
    if lead:
        _announce(cfg, trainer, loader, out, resumed)
    # Opened after the restore: a step set aside above is gone from its list of steps.
    mngr = checkpoint.manager(out, keep_last=cfg.keep_last, keep_every=cfg.keep_every, async_save=True)
    log = MetricsLog(out, cfg, enabled=lead, keep_until=resumed)

    harness = _harness(cfg, trainer, state["params"], tokenizer, lead)
    began = time.perf_counter()
    start = int(state["step"])
    bar = tqdm(total=cfg.total_steps, initial=start, disable=not (lead and progress), unit="step", dynamic_ncols=True)
    report = StepReport(cfg, trainer, log, bar, start, lead)

    def validation() -> dict[str, float]:
        row = {f"val/{name}": trainer.evaluate(state["params"], vl, cfg.val_batches) for name, vl in val.items()}
        return {**row, **(harness(trainer.merged(state["params"])) if harness is not None else {})}

    stopped_at = None
    for step in range(start + 1, cfg.total_steps + 1):
        state, metrics = trainer.step(state, next(loader))
        validate = (bool(val) or harness is not None) and step % cfg.val_every == 0
        if step % cfg.log_every == 0 or step == cfg.total_steps or validate:
            report.row(step, metrics, validation if validate else None)
        bar.update(1)
        stop, lost = stops.agreed(writer is not None and writer.lost is not None)
        if lost:
            raise lock.taken_over(writer, out, step)
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == cfg.total_steps or stop:
            mngr.save(step, args=checkpoint.save_args(state["params"], cfg, tokenizer, state["opt_state"],
                                                      _step_meta(trainer, loader, step)))
            log.sync()  # a bucket's metrics.jsonl keeps up with its checkpoints
            if hooks.after_save:
                hooks.after_save(step)  # (the async write is in flight)
        if hooks.after_step:
            hooks.after_step(step, mngr.wait_until_finished)
        if stop:
            stopped_at = step
            break
    stops.finishing = True
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    if lead:
        plot_loss_curve(log.path, out / "loss.png")
        if outcome := _outcome(cfg, out, log, start, stopped_at, stops.signal, time.perf_counter() - began):
            print(outcome, flush=True)
    log.close()
    return state


def _step_meta(trainer: Trainer, loader: Loader, step: int) -> dict:
    """A checkpoint's meta: the step, the data position, the step's RNG key and (LoRA) the base it adapts."""
    key = jax.random.fold_in(jax.random.key(trainer.cfg.seed), step)
    meta = {"step": step, "data": loader.state(), "rng": np.asarray(jax.random.key_data(key)).tolist()}
    return meta if trainer.base_record is None else {**meta, "lora_base": trainer.base_record}


class StepReport:
    """The training loop's rows of metrics, into the log and onto the progress bar, with tokens/s and MFU since
    the previous row (none for the first step after a start, which includes compilation; validation time is
    left out)."""

    def __init__(self, cfg: Config, trainer: Trainer, log: MetricsLog, bar: Any, start: int, lead: bool):
        self.log, self.bar, self.start, self.lead = log, bar, start, lead
        self.tokens_per_step = cfg.gradient_accumulation_steps * trainer.global_batch * cfg.seq
        self.flops_token, self.peak = flops_per_token(cfg), peak_flops(cfg.dtype)
        self.t_last, self.step_last = time.perf_counter(), start

    def row(self, step: int, metrics: dict, validation: Callable[[], dict[str, float]] | None) -> None:
        metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
        now = time.perf_counter()
        first = self.step_last == self.start and step == self.start + 1
        tps = 0.0 if first else self.tokens_per_step * (step - self.step_last) / (now - self.t_last)
        self.t_last, self.step_last = now, step
        row = {"step": step, **metrics, "tokens_per_sec": tps, "mfu": tps * self.flops_token / self.peak}
        if "learned_tokens" in metrics:  # packed data: the targets learned, at this step's share of them
            row["useful_tokens_per_sec"] = tps * metrics["learned_tokens"] / self.tokens_per_step
        if validation is not None:
            row.update(validation())
            self.t_last = time.perf_counter()
            if self.lead:
                self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                           if k.startswith(("val/", "eval/"))))
        self.log.write(row)
        self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tps:,.0f}")


def _starting_state(trainer: Trainer, loader: Loader, out: epath.Path, tune_model_path: str | None, fresh_opt: bool,
                    lead: bool) -> tuple[State, int]:
    """The state training starts from and the step it resumes at (0 for a new run): the newest checkpoint in
    `out` (the loader put back where it was), else --tune-model-path's weights, else a fresh init."""
    if checkpoint.complete_steps(out):
        state, meta = _restore_state(trainer, out, with_opt=True, resume=True)
        loader.restore(meta["data"])
        if lead:
            print(f"resuming {out} from step {int(state['step'])}")
            if getattr(loader, "weights_changed", None):
                print(loader.weights_changed)
        return state, int(state["step"])
    if tune_model_path and convert.is_hf_dir(tune_model_path):
        raise ConfigError(f"--tune-model-path {tune_model_path} is a Hugging Face model directory: convert it "
                          f"first (mtj-from-hf --hf {tune_model_path} --out CKPT) and give CKPT")
    if lora.enabled(trainer.cfg):
        if not tune_model_path:
            raise ConfigError(f"lora_rank={trainer.cfg.lora_rank} trains adapters on a frozen base model: give it as "
                              "--tune-model-path CKPT")
        trainer.set_base(*checkpoint.restore_lora_base(tune_model_path, trainer.cfg, trainer.mesh, trainer.cfg.dtype))
        if lead:
            print(f"training LoRA adapters on {trainer.base_record['path']} (frozen)")
        return trainer.init(), 0
    if tune_model_path:
        state, _ = _restore_state(trainer, tune_model_path, with_opt=not fresh_opt, resume=False)
        if lead:
            print(f"fine-tuning from {tune_model_path}" + (" with a fresh optimizer" if fresh_opt else ""))
        return state, 0
    return trainer.init(), 0


def _announce(cfg: Config, trainer: Trainer, loader: Loader, out: epath.Path, resumed: int) -> None:
    """The lead's start: the run's config.json, its summary, and a word when there is nothing to train."""
    cfg.save(out / "config.json")
    print(summary(cfg, trainer, loader, out), flush=True)
    if resumed >= cfg.total_steps:
        print(f"{out} is already at step {resumed} of total_steps={cfg.total_steps}: nothing to train "
              f"(to go on, raise total_steps, e.g. total_steps={resumed + cfg.total_steps})")


def _outcome(cfg: Config, out: epath.Path, log: MetricsLog, start: int, stopped_at: int | None, signal_name: str | None,
             seconds: float) -> str | None:
    """The run's closing line (the lead prints it); None when it trained nothing (the start said so)."""
    if stopped_at is not None:
        return (f"stopped by {signal_name or 'a signal to another process'} after step {stopped_at}: checkpoint "
                f"{out}/step_{stopped_at} is saved; run the same command to go on from it")
    if cfg.total_steps <= start:
        return None
    last = read_metrics(log.path)[-1]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k == "loss" or k.startswith(("val/", "eval/")))
    return (f"trained steps {start + 1}-{cfg.total_steps} in {seconds:.0f} s; step {last['step']}: {shown}; "
            f"checkpoints: {out}")  # (no listing here: Orbax's syncs all processes)


def summary(cfg: Config, trainer: Trainer, loader: Loader, out: epath.Path) -> str:
    """What a run is, in a few lines: the model, the devices and mesh, the batch and the data."""
    base = count_params(lora.base_config(cfg))
    adapters = (f"\nLoRA: rank {cfg.lora_rank} on {', '.join(cfg.lora_targets)}, {(count_params(cfg) - base) / 1e6:,.2f}M "
                f"trained parameters; the base frozen in {cfg.dtype if cfg.base_quant == 'none' else cfg.base_quant}"
                if lora.enabled(cfg) else "")
    return "\n".join([
        f"model: {cfg.model_type}, {base / 1e6:,.1f}M parameters ({cfg.layers} layers, d_model "
        f"{cfg.d_model}, {cfg.n_heads} heads, context {cfg.seq}, vocabulary {cfg.n_vocab}), compute {cfg.dtype}{adapters}",
        f"devices: {trainer.mesh.size} x {trainer.mesh.devices.flat[0].device_kind} over {jax.process_count()} process(es), "
        f"mesh {dict(trainer.mesh.shape)}",
        f"batch: {cfg.gradient_accumulation_steps} x {trainer.global_batch} sequences of {cfg.seq} tokens = "
        f"{cfg.gradient_accumulation_steps * trainer.global_batch * cfg.seq:,} tokens per step",
        f"data: {cfg.train_set} ({loader.describe()}); "
        f"run: {out}, to step {cfg.total_steps}"])
