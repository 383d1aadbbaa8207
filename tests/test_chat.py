"""/v1/chat/completions on a random GPT-NeoX whose tokenizer has a chat template: the prompt the server renders
against transformers' apply_chat_template, its answers against generate_tokens, judged by the `openai` client and
lm-eval's local-chat-completions model (against the harness's own hf model with the same template)."""

import json
import math

import numpy as np
import openai
import pytest

import mtj
from conftest import SHARP
from mtj.chat import ChatTemplate, ChatTemplateError
from mtj.tokenizer import load_tokenizer
from mtj.workflows import export_hf, import_hf
from test_neo_neox import hf_model
from test_openai import log_softmax
from test_serve import Running, request

# OpenAssistant's turn format, written to use what transformers gives a template: loop controls, the special
# tokens, tojson, raise_exception, and block tags on lines of their own (trim_blocks, lstrip_blocks)
TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'system' and not loop.first %}
        {{ raise_exception('the system message must come first') }}
    {% endif %}
    {% if message['role'] == 'tool' %}{% continue %}{% endif %}
<|{{ 'prompter' if message['role'] == 'user' else message['role'] }}|>
{%- if message['name'] is defined %}{{ message['name'] | tojson }}: {% endif %}
{{ message['content'] }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a tree?"},
     {"role": "assistant", "content": "A plant."}, {"role": "user", "content": "And a forest? \u00e9\u4e2d"}],
    [{"role": "user", "content": "Quote \"this\" <b>", "name": "ann"}, {"role": "tool", "content": "skipped"}],
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """serve.py on the mtj-from-hf import of a random GPT-NeoX (fp32) whose tokenizer_config.json has TEMPLATE;
    the HF directory's transformers tokenizer; the model loaded here."""
    import transformers

    root = tmp_path_factory.mktemp("chat")
    hf_model(root / "hf", "neox", 7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             vocab_size=50432, max_position_embeddings=256, use_parallel_residual=True, **SHARP)
    tok = load_tokenizer("gpt-neox-20b")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "hf")
    import_hf(root / "hf", root / "ckpt", dtype="float32")
    srv = Running(root / "ckpt", "--served-model-name", "chat", "--max-batch", "4")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="unused", max_retries=0, timeout=120)
    client.port, client.root = srv.port, root
    yield client, transformers.AutoTokenizer.from_pretrained(root / "hf"), mtj.load(root / "ckpt")
    assert srv.stop() == 0


def hf_ids(hf_tok, messages, add_generation_prompt=True) -> list[int]:
    out = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_the_template_travels_with_the_checkpoint_and_its_export(served):
    client, hf_tok, lm = served
    assert lm.tokenizer.chat_template == TEMPLATE
    export_hf(client.root / "ckpt", client.root / "export")
    config = json.loads((client.root / "export" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE and config["eos_token"] == "<|endoftext|>"


def test_the_rendered_prompt_is_apply_chat_template(served):
    client, hf_tok, lm = served
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            want = hf_ids(hf_tok, messages, generation_prompt)
            status, body = request(client.port, "/tokenize", {"messages": messages, "add_generation_prompt": generation_prompt})
            assert status == 200 and json.loads(body)["tokens"] == want, messages
    # text parts are joined by newlines (as vLLM joins them) before the template reads them
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    status, body = request(client.port, "/tokenize", {"messages": parts})
    assert json.loads(body)["tokens"] == hf_ids(hf_tok, [{"role": "user", "content": "one\ntwo"}])


def test_greedy_answers_equal_generate_tokens_streamed_or_not(served):
    client, hf_tok, lm = served
    for messages in CONVERSATIONS:
        ids = hf_ids(hf_tok, messages)
        want = lm.decode_new(lm.generate_tokens([ids], 12, temperature=0)[0])
        got = client.chat.completions.create(model="chat", messages=messages, max_tokens=12, temperature=0)
        assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == want
        assert got.usage.prompt_tokens == len(ids)
        newer = client.chat.completions.create(model="chat", messages=messages, max_completion_tokens=12, temperature=0)
        assert newer.choices[0].message.content == want
        chunks = list(client.chat.completions.create(model="chat", messages=messages, max_tokens=12, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == got.choices[0].finish_reason
        assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == got.usage.completion_tokens


def test_sampling_n_stop_penalties_and_logprobs(served):
    client, hf_tok, lm = served
    messages = CONVERSATIONS[1]
    ids = hf_ids(hf_tok, messages)
    kw = dict(model="chat", messages=messages, max_tokens=8, temperature=0.9, top_p=0.95, seed=5)
    two = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.prompt_tokens == len(ids)
    again = client.chat.completions.create(n=2, **kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]  # the seed decides
    want = lm.generate_tokens([ids], 8, temperature=0, repetition_penalty=1.5, logit_bias={9: 5.0})[0]
    got = client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0, logit_bias={"9": 5},
                                         extra_body={"repetition_penalty": 1.5})
    assert got.choices[0].message.content == lm.decode_new(want)
    plain = client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=3)
    generated = lm.generate_tokens([ids], 8, temperature=0)[0]
    generated = [t for t in generated if t != lm.tokenizer.eos_id]
    logp = log_softmax(lm, ids + generated)
    content = plain.choices[0].logprobs.content
    assert [c.token for c in content] == [lm.tokenizer.decode([t]) for t in generated]
    for k, (entry, t) in enumerate(zip(content, generated)):
        assert math.isclose(entry.logprob, logp[len(ids) + k - 1, t], abs_tol=1e-4)
        assert entry.bytes == list(entry.token.encode()) and len(entry.top_logprobs) <= 3
        assert entry.top_logprobs[0].logprob == pytest.approx(np.max(logp[len(ids) + k - 1]), abs=1e-4)
    text = plain.choices[0].message.content
    if len(text) > 2:  # a stop string ends the text before it
        cut = client.chat.completions.create(model="chat", messages=messages, max_tokens=8, temperature=0, stop=[text[2:]])
        assert cut.choices[0].message.content == text[:2] and cut.choices[0].finish_reason == "stop"


def test_mistakes_are_400s_naming_them(served):
    client, _, _ = served
    for body, message in (
            ({"messages": []}, "'messages'"),
            ({"messages": [{"role": "wizard", "content": "x"}]}, "'messages.0.role'"),
            ({"messages": [{"content": "x"}]}, "'messages.0.role'"),
            ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "'messages.0.tool_calls' is not implemented"),
            ({"messages": "hello"}, "'messages'"),
            ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]},
             "the system message must come first"),
            ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 2}, "not both"),
            ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "'top_logprobs' needs 'logprobs'"),
            ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}, "exceeds this server's limit"),
            ({"messages": [{"role": "user", "content": "x"}], "model": "other"}, "serves 'chat'")):
        status, answer = request(client.port, "/v1/chat/completions", body)
        assert status in (400, 404) and message in json.loads(answer)["error"]["message"], (body, answer)
    assert request(client.port, "/health")[0] == 200


def test_templates_render_as_transformers_and_fail_with_their_message():
    import transformers

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=load_tokenizer("gpt2").backend, eos_token="<|endoftext|>")
    special = {"eos_token": "<|endoftext|>"}
    for messages in CONVERSATIONS[:2]:
        for generation_prompt in (True, False):
            want = tok.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=False,
                                           add_generation_prompt=generation_prompt)
            assert ChatTemplate(TEMPLATE, special).render(messages, generation_prompt) == want
    with pytest.raises(ChatTemplateError, match="does not parse.*line 1"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="must come first"):
        ChatTemplate(TEMPLATE, special).render(CONVERSATIONS[1][1:] + CONVERSATIONS[1][:1])
    with pytest.raises(ChatTemplateError, match="refused|failed"):  # the sandbox: no reaching into Python
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])


def test_lm_eval_local_chat_completions_equals_its_hf_model(served, tmp_path):
    """A generate_until task through lm-eval's local-chat-completions model (the server renders the template)
    and through the harness's own hf model on our export (transformers renders it): the same answers."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from test_harness import write_tasks

    client, _, _ = served
    if not (client.root / "export").is_dir():
        export_hf(client.root / "ckpt", client.root / "export")
    include = [str(write_tasks(tmp_path / "tasks"))]

    def answers(model: str, args: str) -> list:
        out = lm_eval.simple_evaluate(model=model, model_args=args, tasks=["mtj_generate"], limit=6, device="cpu",
                                      batch_size=1, task_manager=TaskManager(include_path=include), log_samples=True,
                                      apply_chat_template=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
        return [x["resps"] for x in out["samples"]["mtj_generate"]]

    ours = answers("local-chat-completions",
                   f"model=chat,base_url=http://127.0.0.1:{client.port}/v1/chat/completions,num_concurrent=1,max_retries=1")
    theirs = answers("hf", f"pretrained={client.root / 'export'},dtype=float32")
    assert ours == theirs and any(r[0][0] for r in ours)


def test_a_chat_template_file_replaces_the_models_own(served, tmp_path):
    """`--chat-template FILE` (Server's chat_template): its template renders the messages; a file that does not
    parse stops mtj-serve before the model loads, naming the file."""
    import subprocess
    import sys

    from starlette.testclient import TestClient

    from conftest import REPO
    from mtj.serve import Server

    client, hf_tok, lm = served
    other = "{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}[ASSISTANT]"
    server = Server(lm, port=0, engine="static", chat_template=other)
    try:
        got = TestClient(server.uvicorn.config.app).post("/tokenize", json={"messages": CONVERSATIONS[1]})
        want = hf_tok.apply_chat_template(CONVERSATIONS[1], chat_template=other, tokenize=False)
        assert got.status_code == 200 and got.json()["tokens"] == lm.tokenizer.encode(want)
    finally:
        server.engine.stop()
    (tmp_path / "bad.jinja").write_text("{% if %}")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), "--ckpt", str(client.root / "nowhere"),
                          "--chat-template", str(tmp_path / "bad.jinja")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and "--chat-template" in run.stderr and "bad.jinja" in run.stderr
    assert "does not parse" in run.stderr and "nowhere" not in run.stderr  # (the checkpoint was never read)
