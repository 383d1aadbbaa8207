"""serve.py (its continuous-batching engine) judged by real clients: the `openai` Python client, and lm-eval's
`local-completions` model."""

import json
import math

import numpy as np
import openai
import pytest

import mtj
from conftest import hf_gptj
from mtj.decode.slots import pool_bytes_per_token
from mtj.workflows import export_hf, import_hf
from mtj.tokenizer import load_tokenizer
from test_serve import Running, request

PROMPTS = ["Hello there", "The king said", "Once upon a time, in a land"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """serve.py on an fp32 checkpoint of a random GPT-J, and the same model loaded here."""
    root = tmp_path_factory.mktemp("openai")
    hf = hf_gptj(root / "hf", vocab_size=50257, n_positions=128, n_embd=32, n_head=4, rotary_dim=4,
                 bos_token_id=50256, eos_token_id=50256)
    load_tokenizer("gpt2").save_pretrained(hf)
    import_hf(hf, root / "ckpt", dtype="float32")
    export_hf(root / "ckpt", root / "export")
    # the continuous engine (the default; the static one: test_serve) with a prefix cache of ~1,000 tokens and
    # speculative decoding: every test here also shows that they change no greedy output
    srv = Running(root / "ckpt", "--served-model-name", "tiny", "--engine", "continuous", "--prefix-cache-gb", "0.0005",
                  "--speculate", "3")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="unused", max_retries=0, timeout=120)
    client.export, client.port = root / "export", srv.port  # for lm-eval's hf model and its local-completions
    yield client, mtj.load(root / "ckpt")
    assert srv.stop() == 0


def log_softmax(lm, ids):
    logits = lm.logits(np.asarray([ids]))[0].astype(np.float64)
    return logits - logits.max(-1, keepdims=True) - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_models_and_greedy_completions_equal_generate_tokens(served):
    client, lm = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for prompt in PROMPTS:
        ids = lm.tokenizer.encode(prompt)
        want = lm.generate_tokens([ids], 10, temperature=0)[0]
        got = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=0)
        choice = got.choices[0]
        assert choice.text == lm.decode_new(want)
        assert choice.logprobs.tokens == [lm.tokenizer.decode([t]) for t in want if t != lm.tokenizer.eos_id]
        assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(choice.logprobs.tokens)
        by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)  # token ids
        assert by_ids.choices[0].text == choice.text


def test_echo_and_logprobs_equal_the_model(served):
    client, lm = served
    got = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=5, temperature=0, logprobs=3, echo=True)
    assert [c.index for c in got.choices] == [0, 1]
    for prompt, choice in zip(PROMPTS, got.choices):
        ids = lm.tokenizer.encode(prompt)
        ids += [t for t in lm.generate_tokens([ids], 5, temperature=0)[0] if t != lm.tokenizer.eos_id]
        lp = choice.logprobs
        assert choice.text.startswith(prompt) and lp.tokens == [lm.tokenizer.decode([t]) for t in ids]
        ref = log_softmax(lm, ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for i in range(1, len(ids)):
            assert math.isclose(lp.token_logprobs[i], ref[i - 1, ids[i]], abs_tol=1e-4)
            alternatives = {}  # the 3 likeliest tokens by text (of two that read alike, the likelier)
            for t in np.argsort(-ref[i - 1])[:3]:
                alternatives.setdefault(lm.tokenizer.decode([t]), ref[i - 1, t])
            assert lp.top_logprobs[i].keys() == alternatives.keys()
            assert all(math.isclose(lp.top_logprobs[i][k], v, abs_tol=1e-4) for k, v in alternatives.items())
        # each token's text sits at its offset in the choice's text
        assert "".join(lp.tokens) == choice.text and len(lp.text_offset) == len(lp.tokens)
        assert [choice.text[o:o + len(t)] for o, t in zip(lp.text_offset, lp.tokens)] == lp.tokens
        assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
        # generated tokens are greedy: each is its position's best
        for i in range(len(lm.tokenizer.encode(prompt)), len(ids)):
            assert lp.token_logprobs[i] == max(lp.top_logprobs[i].values())
    # max_tokens 0 with echo: the prompt's log-probabilities only
    only = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=0, echo=True, logprobs=1).choices[0]
    ids = lm.tokenizer.encode(PROMPTS[0])
    assert only.text == PROMPTS[0] and len(only.logprobs.token_logprobs) == len(ids)
    rows = client.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=0, echo=True, logprobs=1, n=2).choices
    assert [c.index for c in rows] == [0, 1, 2, 3] and [c.text for c in rows] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert rows[0].logprobs == rows[1].logprobs == only.logprobs and rows[2].logprobs == rows[3].logprobs


def test_sampling_streams_n_and_usage(served):
    client, lm = served
    args = dict(model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=1.0, top_p=0.9, seed=7, n=2)
    plain = client.completions.create(**args)
    assert len(plain.choices) == 2 and plain.choices[0].text != plain.choices[1].text
    again = client.completions.create(**args)
    assert [c.text for c in again.choices] == [c.text for c in plain.choices]  # seeded
    texts, usage = ["", ""], None
    for chunk in client.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
        usage = chunk.usage or usage
    assert texts == [c.text for c in plain.choices]
    assert usage is not None and usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens == len(lm.tokenizer.encode(PROMPTS[2]))


def test_stop_ends_the_text(served):
    client, lm = served
    full = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_client_errors_name_the_problem(served):
    client, _ = served
    with pytest.raises(openai.NotFoundError, match="serves 'tiny'"):
        client.completions.create(model="other", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match=r"frequency_penalty must be in \[-2, 2\]"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, frequency_penalty=2.5)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, logit_bias={"50257": -100})
    with pytest.raises(openai.BadRequestError, match="'logit_bias' keys must be token ids"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, logit_bias={"x": -100})
    with pytest.raises(openai.BadRequestError, match="'best_of' other than n"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, best_of=3)
    # what client libraries send by default: the neutral values change nothing
    plain = client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0).choices[0].text
    assert client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0, presence_penalty=0,
                                     frequency_penalty=0, best_of=1, logit_bias={}).choices[0].text == plain
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, temperature=2.5)
    with pytest.raises(openai.BadRequestError, match="this model has no chat template.*--chat-template FILE"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])


def test_penalties_and_logit_bias_equal_generate_tokens(served):
    """OpenAI's presence_penalty, frequency_penalty and logit_bias and vLLM's repetition_penalty through the
    continuous engine (with its prefix cache and speculation): generate_tokens' tokens."""
    client, lm = served
    ids = lm.tokenizer.encode(PROMPTS[2])
    for kw in (dict(presence_penalty=1.5), dict(frequency_penalty=1.0, logit_bias={"11": -100, "262": 5}),
               dict(repetition_penalty=1.8)):
        bias = {int(t): b for t, b in kw.get("logit_bias", {}).items()}
        want = lm.generate_tokens([ids], 12, temperature=0, **{**kw, "logit_bias": bias})[0]
        openai_kw = {k: v for k, v in kw.items() if k != "repetition_penalty"}
        got = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0, **openai_kw,
                                        extra_body={"repetition_penalty": kw.get("repetition_penalty", 1.0)})
        assert got.choices[0].text == lm.decode_new(want)


def test_tokenize_and_detokenize_round_trip(served):
    """vLLM's /tokenize and /detokenize: the ids a completion of the prompt reads (its usage counts them), their
    BPE strings, and the text back; mistakes are 4xx naming them."""
    client, lm = served
    text = "Hello there, general Kenobi"
    ids = lm.tokenizer.encode(text)
    status, body = request(client.port, "/tokenize", {"model": "tiny", "prompt": text, "return_token_strs": True})
    assert status == 200 and json.loads(body) == {"count": len(ids), "max_model_len": 128, "tokens": ids,
                                                  "token_strs": [lm.tokenizer.backend.id_to_token(t) for t in ids]}
    assert client.completions.create(model="tiny", prompt=text, max_tokens=1).usage.prompt_tokens == len(ids)
    assert json.loads(request(client.port, "/tokenize", {"prompt": text})[1])["token_strs"] is None
    status, body = request(client.port, "/detokenize", {"tokens": ids})
    assert status == 200 and json.loads(body) == {"prompt": text}
    for path, body, status, message in (("/tokenize", {"model": "other", "prompt": "x"}, 404, "serves 'tiny'"),
                                        ("/tokenize", {"prompt": 5}, 400, "'prompt'"),
                                        ("/detokenize", {"tokens": [1, 50257]}, 400, "token ids must be in [0, 50257)"),
                                        ("/detokenize", {"tokens": [1], "x": 1}, 400, "'x' is not implemented")):
        got = request(client.port, path, body)
        assert got[0] == status and message in json.loads(got[1])["error"]["message"], got


def test_lm_eval_local_completions_equals_its_hf_model(served, tmp_path):
    from mtj.harness import task_dir
    from test_harness import evaluate, write_tasks

    client, _ = served
    include = [task_dir(), str(write_tasks(tmp_path / "tasks"))]
    tasks = ["lambada_openai", "mtj_generate"]
    api = (f"model=tiny,base_url=http://127.0.0.1:{client.port}/v1/completions,tokenizer={client.export},"
           "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1,max_length=128")
    ours = evaluate("local-completions", api, tasks, include, limit=8)
    theirs = evaluate("hf", f"pretrained={client.export},dtype=float32", tasks, include, limit=8)
    assert ours["results"]["lambada_openai"]["acc,none"] == theirs["results"]["lambada_openai"]["acc,none"]
    assert math.isclose(ours["results"]["lambada_openai"]["perplexity,none"],
                        theirs["results"]["lambada_openai"]["perplexity,none"], rel_tol=1e-4)
    for x, y in zip(ours["samples"]["lambada_openai"], theirs["samples"]["lambada_openai"]):
        (a, greedy_a), (b, greedy_b) = x["resps"][0][0], y["resps"][0][0]
        assert math.isclose(a, b, rel_tol=1e-4) and greedy_a == greedy_b
    assert [x["resps"] for x in ours["samples"]["mtj_generate"]] == [y["resps"] for y in theirs["samples"]["mtj_generate"]]


def test_a_mix_in_flight_is_token_identical_to_generate_tokens(served):
    """Different prompt lengths and max_tokens at once, some streaming, some cancelled midway."""
    import concurrent.futures
    import json
    import socket

    client, lm = served
    rng = np.random.RandomState(3)
    jobs = [(rng.randint(0, 50000, rng.randint(1, 80)).tolist(), int(rng.randint(1, 40)), i % 2 == 0) for i in range(12)]

    def ask(job):
        ids, max_tokens, stream = job
        if not stream:
            return client.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0, stream=True) if c.choices)

    def cancel(_):  # a streaming request whose client leaves after its first event
        body = json.dumps({"prompt": "Leaving early", "max_tokens": 100, "temperature": 0, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", client.port), timeout=60) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            seen = b""
            for _ in range(100):
                seen += s.recv(65536)
                if b"data: " in seen:
                    return True
        return False

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        left = [pool.submit(cancel, i) for i in range(3)]
        texts = list(pool.map(ask, jobs))
        assert all(f.result() for f in left)
    for (ids, max_tokens, _), text in zip(jobs, texts):
        assert text == lm.decode_new(lm.generate_tokens([ids], max_tokens, temperature=0)[0])


def scrape(port: int) -> dict:
    """/metrics, read with prometheus_client's own parser: {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = request(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_a_load_test_did(served):
    import concurrent.futures

    client, lm = served
    header = "In the beginning the model read a long shared header, and every request began with it: "
    asks = [dict(prompt=header + f"request {i}", max_tokens=3 + i, temperature=0, n=1 + i % 2, stream=i % 3 == 0)
            for i in range(8)] + [dict(prompt="x", max_tokens=2, temperature=2.5)] * 3  # three 400s

    def ask(args):
        try:
            if not args.get("stream"):
                usage = client.completions.create(model="tiny", **args).usage
            else:
                usage = [c.usage for c in client.completions.create(model="tiny", **args,
                                                                    stream_options={"include_usage": True}) if c.usage][0]
        except openai.BadRequestError:
            return None
        return usage.prompt_tokens, usage.completion_tokens

    before = scrape(client.port)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, asks))
    after = scrape(client.port)

    def grew(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    done = [(a, args["n"]) for a, args in zip(answers, asks) if a is not None]
    assert len(done) == 8 and grew("mtj_requests_total", endpoint="/v1/completions", status="200") == 8
    assert grew("mtj_requests_total", endpoint="/v1/completions", status="400") == 3
    rows = sum(n for _, n in done)
    assert grew("mtj_prompt_tokens_total") == sum(p * n for (p, _), n in done)  # (usage counts a prompt once for n rows)
    assert grew("mtj_generation_tokens_total") == sum(c for (_, c), _ in done)
    assert grew("mtj_time_to_first_token_seconds_count") == rows
    assert grew("mtj_inter_token_latency_seconds_count") == sum(c for (_, c), _ in done) - rows
    # every row's prompt (but its last token) was looked up in the prefix cache; the shared header was found
    looked_up = sum(len(lm.tokenizer.encode(args["prompt"])) - 1 for args in asks[:8] for _ in range(args["n"]))
    assert grew("mtj_prefix_cache_queries_total") == looked_up
    assert 0.5 * looked_up < grew("mtj_prefix_cache_hits_total") < looked_up
    assert after[("mtj_queue_depth", ())] == 0 and after[("mtj_busy_slots", ())] == 0
    assert 0 <= grew("mtj_spec_decode_accepted_tokens_total") <= grew("mtj_spec_decode_draft_tokens_total") > 0
    assert after[("mtj_prefix_cache_capacity_tokens", ())] == 0.0005 * 2 ** 30 // pool_bytes_per_token(lm.config)
