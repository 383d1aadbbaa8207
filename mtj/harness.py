"""lm-evaluation-harness's model interface backed by mtj: `--model mtj` (registered on import).

The harness keeps what it does (tasks, prompts, few-shot, request splitting, metrics); this is
only the mtj side. Log-likelihoods go through `evaluate.Scorer`: one forward pass per batch on
the mesh, requests longer than the context cut from the left as the harness's HF model cuts
them. Generation goes through mtj's compiled generator. `python -m mtj.harness ARGS` is the
harness's own command line (`lm_eval ARGS`) with `mtj` registered.
"""

from __future__ import annotations

import json
import logging
import os
import string
import tempfile
from collections import defaultdict
from importlib import resources
from typing import Any, Sequence

from jax.sharding import Mesh
from tqdm import tqdm

from mtj.config import Config, ConfigError
from mtj.decode.stops import RowText
from mtj.evaluate import Scorer
from mtj.lm import LM, load
from mtj.model import Params
from mtj.paths import user_path
from mtj.tokenizer import Tokenizer, assets_dir

try:  # the `eval` extra. Without it this module still imports (training does) and MISSING says why not.
    import lm_eval
    import lm_eval.models  # noqa: F401 -- the harness lists its own models only into an empty registry: first
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager, get_task_dict
    from lm_eval.tasks._yaml_loader import load_yaml

    MISSING: ImportError | None = None
except ImportError as e:
    MISSING = e
    TemplateLM = object

    def register_model(name: str) -> Any:
        return lambda cls: cls


@register_model("mtj")
class MTJLM(TemplateLM):
    """`--model_args ckpt=PATH[,mp=N][,dtype=float32][,quantize=int8][,max_gen_toks=256]`: a checkpoint (ours
    or an HF directory) on mp devices; `dtype` overrides its compute dtype, `quantize` its inference weights."""

    def __init__(self, ckpt: str | None = None, mp: int | str = 1, dtype: str | None = None,
                 batch_size: int | str | None = 8, max_gen_toks: int | str = 256, lm: LM | None = None,
                 device: str | None = None, max_batch_size: int | None = None, quantize: str | None = None) -> None:
        # `device` and `max_batch_size` come from the harness's command line: the mesh decides the devices.
        super().__init__()
        if lm is None and ckpt is None:
            raise ValueError("the mtj model needs model_args ckpt=PATH (a model_dir, step directory or HF directory)")
        if lm is None:
            lm = load(ckpt, mp=int(mp), **{k: v for k, v in (("quantize", quantize), ("dtype", dtype)) if v})
        self.lm = lm
        self.tok = self.lm.require_tokenizer()
        size = str(batch_size or 8)
        self.batch = int(size) if size.isdigit() else 8  # "auto": the harness's HF model searches; 8 here
        self.max_gen_toks = int(max_gen_toks)
        self.scorer = Scorer(self.lm.config, self.lm.mesh, self.batch)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.lm.config.seq

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)  # GPT-2-style BPE adds no special tokens

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        # Longest first, as the harness orders them: similar lengths share a batch and its padding.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        pairs = [(requests[i][1], requests[i][2]) for i in order]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for i, score in zip(order, self.scorer.loglikelihoods(self.lm.params, pairs, progress=not disable_tqdm)):
            results[i] = score
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (text,) in [req.args for req in requests]:
            rolling = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            pairs = [lm_utils.make_disjoint_window(w) for w in rolling]
            windows += [(None, context, continuation) for context, continuation in pairs]
            counts.append(len(pairs))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for req, count in zip(requests, counts):
            totals.append(sum(logp for logp, _ in scores[start:start + count]))
            start += count
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, totals[-1])
        return totals

    def _sampling(self, gen_kwargs: dict) -> tuple[list[str], int, dict]:
        """(stop strings, max new tokens, generator sampling arguments) of one request's gen_kwargs,
        read as the harness's HF model reads them: greedy unless do_sample or a temperature > 0."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = kwargs.pop("do_sample", None)
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
        if kwargs:
            raise ValueError(f"mtj does not implement the generation arguments {sorted(kwargs)} "
                             "(it has until, max_gen_toks, do_sample, temperature, top_k, top_p)")
        if do_sample is False:
            temperature = 0.0
        if not 1 <= max_new < self.max_length:
            raise ValueError(f"max_gen_toks={max_new} must be in 1..{self.max_length - 1} (the context is {self.max_length})")
        return until, max_new, {"temperature": temperature, "top_k": top_k, "top_p": top_p}

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)  # requests with the same gen_kwargs decode together
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm)
        for members in groups.values():
            until, max_new, sampling = self._sampling(requests[members[0]].args[1])
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] for i in members}
            members.sort(key=lambda i: -len(prompts[i]))
            for start in range(0, len(members), self.batch):
                chunk = members[start:start + self.batch]
                outs = self.lm.generate_tokens([prompts[i] for i in chunk], max_new, seed=chunk, **sampling)
                for i, ids in zip(chunk, outs):
                    results[i] = text = RowText.of(self.lm.tokenizer, self.lm.tokenizer.eos_id, ids, until).text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return results


class _OwnOverrides(logging.Filter):
    """The harness warns whenever an include path's task replaces one of its own. mtj's `lambada_openai` does
    so on purpose (local data), at every run: that warning is dropped; a user's own overrides still warn."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Task '%s' from %s overrides") and
                    f"{os.sep}{TASK_DIR_PREFIX}" in str(record.args[1] if record.args else ""))


TASK_DIR_PREFIX = "mtj-tasks-"
logging.getLogger("lm_eval.tasks._index").addFilter(_OwnOverrides())


def task_dir() -> str:
    """A folder of the task YAMLs that ship with mtj, for the harness's `include_path`: the local
    `lambada_openai` (its data read from $MTJ_ASSETS/eval/lambada_test.jsonl, not the hub)."""
    folder = tempfile.mkdtemp(prefix=TASK_DIR_PREFIX)
    assets = assets_dir()
    root = str(assets) if assets else "/set-MTJ_ASSETS-to-the-assets-folder"  # what the data error will show
    values = {"lambada_test": f"{root}/eval/lambada_test.jsonl"}
    for item in resources.files("mtj").joinpath("tasks").iterdir():
        if item.name.endswith(".yaml"):
            (user_path(folder) / item.name).write_text(string.Template(item.read_text()).substitute(values))
    return folder


# The original configs' eval_harness_tasks names that today's harness calls otherwise.
ORIGINAL_NAMES = {"lambada": "lambada_openai"}


def task_manager(include: Sequence[str] = ()) -> TaskManager:
    """The harness's tasks, mtj's local ones over them, and the user's `include` folders over both."""
    return TaskManager(include_path=[task_dir(), *include])


def resolve_tasks(names: Sequence[str], manager: TaskManager) -> list[str | dict]:
    """Harness task names (original short names mapped) or configs of task YAML files; unknown
    names are refused with the harness's own message."""
    tasks: list[str | dict] = []
    for name in names:
        if name.endswith(".yaml"):
            tasks.append(load_yaml(user_path(name), resolve_func=True))
        else:
            tasks.append(ORIGINAL_NAMES.get(name, name))
    missing = [t for t in tasks if isinstance(t, str) and not manager.match_tasks([t])]
    if missing:
        raise ConfigError(f"Tasks not found: {', '.join(missing)}")
    return tasks


def run(model: MTJLM, tasks: Sequence[str | dict], manager: TaskManager, limit: int | None = None,
        num_fewshot: int | None = None) -> dict:
    """The harness's results dict for `tasks` (seeded as its command line seeds them)."""
    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, bootstrap_iters=0 if limit else 100000)


class TrainingEval:
    """`eval_harness_tasks` during training: the harness on the current parameters at each validation.

    Every process runs the same requests in the same order, so the forward passes over the
    sharded model stay in lockstep. A task that cannot be loaded (its data is not available
    offline) is reported once, with the reason, and left out; training goes on.
    """

    def __init__(self, cfg: Config, params: Params, mesh: Mesh, tokenizer: Tokenizer, report: bool) -> None:
        self.model = MTJLM(lm=LM(cfg, params, mesh, tokenizer))
        self.manager = task_manager()
        self.tasks: list[str | dict] = []
        for name in cfg.eval_harness_tasks:
            try:
                [task] = resolve_tasks([name], self.manager)
                get_task_dict([task], self.manager)  # loads the data: a task without local data fails here
                self.tasks.append(task)
            except Exception as e:  # noqa: BLE001 -- any reason to leave a task out is reported
                if report:
                    print(f"eval_harness_tasks: leaving out '{name}': {type(e).__name__}: {str(e)[:300]}. Give its data "
                          "as a local task YAML (dataset_path: json, dataset_kwargs.data_files) named in "
                          "eval_harness_tasks, or put it in the datasets cache")

    def __call__(self, params: Params) -> dict[str, float]:
        """{"eval/<task>/<metric>": value} of the harness's results for `params`."""
        if not self.tasks:
            return {}
        self.model.lm.set_params(params)
        results = lm_eval.simple_evaluate(model=self.model, tasks=list(self.tasks), task_manager=self.manager,
                                          bootstrap_iters=0, verbosity="WARNING")
        return {f"eval/{task}/{key.split(',')[0]}": float(value)
                for task, metrics in results["results"].items() for key, value in metrics.items()
                if "," in key and "stderr" not in key and isinstance(value, (int, float))}


if __name__ == "__main__":
    import sys

    from lm_eval.__main__ import cli_evaluate

    if "--include_path" not in sys.argv:  # mtj's local tasks (lambada_openai from $MTJ_ASSETS)
        sys.argv += ["--include_path", task_dir()]
    cli_evaluate()
