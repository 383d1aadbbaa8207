"""Who may use a shared server (mtj/access.py), through the real server: API keys, TLS, the refusal to
serve beyond loopback without a key, each key's bounded share of the queue, CORS."""

import concurrent.futures
import datetime
import http.client
import ipaddress
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.error

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import REPO
from mtj import access
from test_serve import Running, ckpt, request  # noqa: F401 -- ckpt: the served model's fixture

KEY_IN_FILE = "sk-file-3f9a7c1e2b"
KEY_ON_ARGV = "sk-argv-8d6e4b2a0c"
KEY_IN_ENV = "sk-env-5c1d9e7f3a"
ORIGIN = "https://notebook.example"


def certificates(folder):
    """A CA, and a certificate for 127.0.0.1 it signed: (CA file, key file, certificate file)."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, public, signer, ca, extra=()):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        for extension in extra:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mtj test CA")])
    ca = cert(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, leaf_key.public_key(),
                ca_key, False, [x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])])
    files = folder / "ca.pem", folder / "key.pem", folder / "cert.pem"
    files[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    files[2].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return files


@pytest.fixture(scope="module")
def shared(ckpt, tmp_path_factory):  # noqa: F811
    """A server as the README shares one: keys from a file, the command line and the environment, TLS, a
    share of 2 rows per key, CORS for one origin."""
    folder = tmp_path_factory.mktemp("access")
    ca, key, cert = certificates(folder)
    (folder / "keys").write_text(f"# team keys\n\n{KEY_IN_FILE}\n")
    tls = ssl.create_default_context(cafile=str(ca))
    srv = Running(ckpt, "--api-key-file", str(folder / "keys"), "--api-key", KEY_ON_ARGV, "--ssl-keyfile", str(key),
                  "--ssl-certfile", str(cert), "--max-queue-per-key", "2", "--max-batch", "2",
                  "--allowed-origins", ORIGIN, env={**os.environ, access.ENV_KEY: KEY_IN_ENV}, tls=tls)
    srv.tls = tls
    yield srv
    assert srv.stop() == 0


def client(srv, key, **kw):
    return openai.OpenAI(base_url=f"https://127.0.0.1:{srv.port}/v1", api_key=key, max_retries=0, timeout=120,
                         http_client=httpx.Client(verify=srv.tls), **kw)


def call(srv, method, path, headers=None, body=None):
    """(status, headers, body) over https."""
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, context=srv.tls, timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
    finally:
        conn.close()


def test_the_openai_client_with_a_key_is_served(shared):
    for key in (KEY_IN_FILE, KEY_ON_ARGV, KEY_IN_ENV):
        c = client(shared, key)
        [model] = c.models.list().data
        got = c.completions.create(model=model.id, prompt="Hello", max_tokens=4, temperature=0)
        streamed = "".join(chunk.choices[0].text for chunk in c.completions.create(
            model=model.id, prompt="Hello", max_tokens=4, temperature=0, stream=True) if chunk.choices)
        assert got.choices[0].text == streamed and got.usage.completion_tokens > 0
    assert "3 API keys" in shared.output()
    deadline = time.time() + 30  # the request log is written by a thread of its own
    while " key#3 POST /v1/completions 200" not in shared.output() and time.time() < deadline:
        time.sleep(0.1)
    assert " key#3 POST /v1/completions 200" in shared.output()  # the log names a key by its place, never its text
    assert not any(key in shared.output() for key in (KEY_IN_FILE, KEY_ON_ARGV, KEY_IN_ENV))


@pytest.mark.parametrize("authorization", [
    None, "Bearer wrong", f"Bearer {KEY_IN_FILE[:-1]}{chr(ord(KEY_IN_FILE[-1]) + 1)}", f"Bearer {KEY_IN_FILE}x",
    "Bearer ", "Bearer", KEY_IN_FILE, f"Basic {KEY_IN_FILE}"], ids=["none", "wrong", "one-character", "longer",
                                                                   "empty", "no-token", "no-scheme", "basic"])
def test_without_a_valid_key_every_path_but_health_is_401(shared, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    body = '{"prompt": "Hello", "max_tokens": 2}'
    for method, path, data in [("GET", "/v1/models", None), ("POST", "/v1/completions", body),
                               ("POST", "/complete", '{"context": "Hello"}'), ("GET", "/no/such/path", None)]:
        status, head, text = call(shared, method, path, headers, data)
        assert status == 401, (method, path, status, text)
        assert head["www-authenticate"] == "Bearer" and '"invalid_api_key"' in text and KEY_IN_FILE not in text
    assert call(shared, "GET", "/health", headers)[0] == 200


def test_the_openai_client_with_a_wrong_key_gets_an_authentication_error(shared):
    for key in ("wrong", KEY_IN_FILE[:-1], KEY_IN_FILE.upper()):
        with pytest.raises(openai.AuthenticationError, match="401 - a valid API key is needed"):
            client(shared, key).completions.create(model="x", prompt="Hello", max_tokens=2)


def test_tls_needs_the_ca_and_refuses_plain_http(shared):
    assert request(shared.port, "/health", tls=shared.tls)[0] == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):  # a client without the CA
        request(shared.port, "/health", tls=ssl.create_default_context())
    with pytest.raises((OSError, http.client.HTTPException)):  # plain http to the TLS port: no answer
        request(shared.port, "/health", timeout=10)


def test_one_key_flooding_gets_429_and_the_other_key_is_served(shared):
    body = '{"prompt": "Flood", "max_tokens": 100, "n": 2, "temperature": 1}'  # each takes the key's whole share
    flood = {"Authorization": f"Bearer {KEY_IN_FILE}"}
    other = {"Authorization": f"Bearer {KEY_ON_ARGV}"}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        flooding = [pool.submit(call, shared, "POST", "/v1/completions", flood, body) for _ in range(12)]
        served = [pool.submit(call, shared, "POST", "/v1/completions", other, '{"prompt": "Hi", "max_tokens": 8}')
                  for _ in range(2)]
        answers = [f.result() for f in flooding]
        assert [f.result()[0] for f in served] == [200, 200]
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 429}, statuses
    refused = next(a for a in answers if a[0] == 429)
    assert refused[1]["retry-after"] == "1" and '"rate_limit_exceeded"' in refused[2]
    # the flood's rows are given back as they end: the key is served again
    assert call(shared, "POST", "/v1/completions", flood, '{"prompt": "x", "max_tokens": 2}')[0] == 200


def test_cors_answers_only_the_allowed_origin(shared):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, head, _ = call(shared, "OPTIONS", "/v1/completions", preflight)  # a browser's preflight has no key
    assert status == 200 and head["access-control-allow-origin"] == ORIGIN
    status, head, _ = call(shared, "OPTIONS", "/v1/completions", {**preflight, "Origin": "https://elsewhere.example"})
    assert status == 400 and "access-control-allow-origin" not in head
    status, head, _ = call(shared, "GET", "/v1/models", {"Origin": ORIGIN, "Authorization": f"Bearer {KEY_IN_ENV}"})
    assert status == 200 and head["access-control-allow-origin"] == ORIGIN


def serve_command(*args, env=None):
    """serve.py's exit status and stderr for arguments that never get as far as opening a socket."""
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), *args], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, **(env or {})})
    return run.returncode, run.stderr


def test_beyond_loopback_without_a_key_refuses_to_start(tmp_path):
    missing = str(tmp_path / "no-such-checkpoint")
    env = {access.ENV_KEY: ""}
    code, err = serve_command("--ckpt", missing, "--host", "0.0.0.0", env=env)
    assert code == 1 and err.count("\n") == 1, err  # one line, before the checkpoint is even looked at
    assert err.startswith("error: --host 0.0.0.0 is reachable") and "--api-key-file" in err \
        and "--allow-unauthenticated" in err
    code, err = serve_command("--ckpt", missing, "--host", "0.0.0.0", "--allow-unauthenticated", env=env)
    assert code == 1 and err.splitlines()[0].startswith("warning: serving without an API key on 0.0.0.0:5000")
    assert "no-such-checkpoint" in err.splitlines()[-1]  # it went on to load the model
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "tpu-vm-0", "[::]"):
        with pytest.raises(access.AccessError, match=f"--host {re.escape(host)} is reachable from other machines"):
            access.check_exposure(host, 5000, [], False)
        assert access.check_exposure(host, 5000, ["k"], False) is None
        assert "anyone who can reach the port" in access.check_exposure(host, 5000, [], True)
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert access.check_exposure(host, 5000, [], False) is None


def test_bad_keys_are_refused_without_echoing_them(tmp_path):
    (tmp_path / "empty").write_text("# nothing yet\n\n")
    (tmp_path / "spaced").write_text("sk-ok\nsk secret-with-space\n")
    code, err = serve_command("--ckpt", str(tmp_path), "--api-key-file", str(tmp_path / "spaced"))
    assert code == 1 and err == f"error: an API key has a space, a control or a non-ASCII character ({tmp_path}/spaced " \
        "line 2); keys are sent in an HTTP header\n", err
    for given, key_file, environ, says in [
            ([], tmp_path / "empty", {}, "holds no API key"), ([""], None, {}, "empty (--api-key number 1)"),
            (["sk-é"], None, {}, "non-ASCII"), ([], None, {access.ENV_KEY: "a\tb"}, access.ENV_KEY)]:
        with pytest.raises(access.AccessError, match=r"^[^é\t]*$") as refused:
            access.load_keys(given, key_file and str(key_file), environ)
        assert says in str(refused.value)
    assert access.load_keys(["a", "b"], None, {access.ENV_KEY: " a\n"}) == ["a", "b"]  # the same key once
    code, err = serve_command("--ckpt", str(tmp_path), "--ssl-keyfile", str(tmp_path / "spaced"))
    assert code == 2 and "TLS needs both --ssl-keyfile and --ssl-certfile" in err


def test_a_callers_share_is_given_back_whatever_ends_its_rows():
    shares = access.Shares(3)
    shares.take("key#1", 2)
    with pytest.raises(access.TooMany, match="has 2 rows queued or decoding and asks for 2 more"):
        shares.take("key#1", 2)
    shares.take("key#2", 3)  # another caller's share is its own
    shares.give_back("key#1", 2)
    assert shares.rows == {"key#2": 3}  # a caller with nothing in flight is not remembered
    shares.take("key#1", 3)
