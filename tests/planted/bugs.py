"""Known bugs, each with the test that must fail on it (run by tests/planted/run.py, not by the suite).

A bug is a list of (file, text, replacement) edits, each text found exactly once in the current source,
and the pytest arguments of the test that names it."""

from typing import NamedTuple


class Bug(NamedTuple):
    name: str
    edits: list[tuple[str, str, str]]
    test: list[str]


SERVE, ENGINE = "mtj/serve.py", "mtj/engine.py"
FAULTS = "tests/test_serve_faults.py"

BUGS = [
    Bug("v1 importer: q and k swapped (the original stores q, v, k)",
        [("mtj/mtj_v1.py", '"layer_{i}/~/linear", "w", "layers.attn.q"', '"layer_{i}/~/linear", "w", "layers.attn.k"'),
         ("mtj/mtj_v1.py", '"layer_{i}/~/linear_2", "w", "layers.attn.k"', '"layer_{i}/~/linear_2", "w", "layers.attn.q"')],
        ["tests/test_mtj_v1.py"]),
    Bug("GPT-NeoX import ignores rope_theta",
        [("mtj/families.py", 'float(rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))', "10000.0")],
        ["tests/test_neo_neox.py", "-k", "conversion"]),
    Bug("GPT-J's rotary turns the wrong way",
        [("mtj/model.py", "jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin]", "jnp.stack([x1 * cos + x2 * sin, x2 * cos - x1 * sin]")],
        ["tests/test_gptj_parity.py", "-k", "h4_rot8"]),
    Bug("GPT-NeoX's rotary (halves) turns the wrong way",
        [("mtj/model.py", "jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin]",
          "jnp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin]")],
        ["tests/test_neo_neox.py", "-k", "neox_parallel"]),
    Bug("GPT-Neo's attention scores scaled by 1/sqrt(d_head) (the released models do not scale)",
        [("mtj/families.py", "rotary=None, scale_scores=False,", "rotary=None, scale_scores=True,")],
        ["tests/test_neo_neox.py", "-k", "neo_alternating"]),
    Bug("GPT-Neo's local layers attend globally",
        [("mtj/families.py", 'return [k == "local" for k in kinds]', "return [False for k in kinds]")],
        ["tests/test_neo_neox.py", "-k", "neo_local_first"]),
    Bug("GPT-J's residual made sequential",
        [("mtj/families.py", "parallel_residual=True, second_norm=False,", "parallel_residual=False, second_norm=False,")],
        ["tests/test_gptj_parity.py", "-k", "h4_rot8"]),
    Bug("SIGTERM does not wait for the requests in flight",
        [(SERVE, "timeout_graceful_shutdown=120", "timeout_graceful_shutdown=0.01")],
        ["tests/test_serve.py", "-k", "sigterm"]),
    Bug("a departed streaming client's rows keep decoding",
        [(SERVE, "        finally:  # also when the client went away (the response task is cancelled)\n"
                 "            self.engine.cancel([job for job in jobs if job is not None])",
          "        finally:\n            pass")],
        [FAULTS, "-k", "abandoned and True"]),
    Bug("pruning in a bucket removes the data before the commit file",
        [("mtj/checkpoint.py", "        (step_dir / COMMIT_FILE).unlink(missing_ok=True)\n", "")],
        ["tests/test_gcs.py", "-k", "unlisted"]),
    Bug("a departed non-streaming client's rows keep decoding",
        [(SERVE, "watcher = asyncio.create_task(self._cancel_when_gone(request, jobs))", "watcher = None")],
        [FAULTS, "-k", "abandoned and False"]),
    Bug("the static batcher batches requests that do not fit the context together, and fails them together",
        [(ENGINE, "fits = max(len(j.ids) for j in (*batch, job)) + max(j.max_new for j in (*batch, job)) "
                  "<= self.lm.config.seq", "fits = True"),
         (ENGINE, "if len(batch) > 1 and not any(job.tokens for job in batch):", "if False:")],
        [FAULTS, "-k", "long_prompt"]),
    Bug("an oversized body is answered before it is read (plain clients see a reset)",
        [(SERVE, "if too_big and size > DRAIN_BYTES:", "if too_big:")],
        [FAULTS, "-k", "sends_all"]),
    Bug("no request-head timeout or idle-connection eviction",
        [(SERVE, "http=limits.protocol(), ", "")],
        [FAULTS, "-k", "never_finish"]),
    Bug("max_tokens null counts no rows in the room check",
        [(SERVE, "len(prompts) * (req.n if generating else 1)", "(len(prompts) * req.n if req.max_tokens else 0)")],
        [FAULTS, "-k", "oversized"]),
    Bug("a failed engine leaves its queued requests unanswered",
        [(ENGINE, '            for job in waiting:\n                job.events.put(("done", stopped))\n', "")],
        [FAULTS, "-k", "failed"]),
    Bug('stop "" ends every row after one token',
        [(SERVE, 'if s]  # "" stops nothing', "]")],
        [FAULTS, "-k", "edge"]),
    Bug("duplicate JSON keys take the last value",
        [(SERVE, "            raise ValueError(f\"the key '{_shown(key)}' appears twice\")", "            pass")],
        [FAULTS, "-k", "edge"]),
    Bug("a deeply nested body answers 500",
        [(SERVE, "    except RecursionError:", "    except ZeroDivisionError:")],
        [FAULTS, "-k", "edge"]),
    Bug("the engine takes a top_k past the vocabulary",
        [(ENGINE, "    if not 0 <= job.top_k <= cfg.n_vocab:", "    if False:")],
        [FAULTS, "-k", "refuses"]),
    Bug("one bad job fails the static batch it is in",
        [(ENGINE, "if len(batch) > 1 and not any(job.tokens for job in batch):", "if False:")],
        [FAULTS, "-k", "refuses"]),
    Bug("a lone surrogate reaches the tokenizer (500)",
        [(SERVE, "                text.encode()\n", "                pass\n")],
        ["tests/test_serve_fuzz.py", "-k", "continuous"]),
    Bug("the static batcher decodes one request at a time",
        [(ENGINE, "        while len(batch) < self.max_batch:", "        while False:")],
        ["tests/test_serve.py", "-k", "concurrent"]),
    Bug("/complete samples at temperature 1 whatever temp says",
        [(SERVE, "jobs = self.jobs_for(ids, req.length, req.temp,", "jobs = self.jobs_for(ids, req.length, 1.0,")],
        ["tests/test_serve.py", "-k", "endpoints"]),
    Bug("logprobs' alternatives are paired with the next token's values",
        [(SERVE, "zip(values[:, :top].tolist(), best[:, :top].tolist())", "zip(values[:, :top].tolist(), best[:, 1:top + 1].tolist())")],
        ["tests/test_openai.py", "-k", "echo"]),
    Bug("text_offset counts each token's own text",
        [(SERVE, "                offsets.append(at)\n                at += len(piece)\n",
          "                at += len(piece)\n                offsets.append(at)\n")],
        ["tests/test_openai.py", "-k", "echo"]),
]
