"""The suite is sealed: nothing it does may reach beyond loopback (the guard in conftest.py)."""

import socket
import time
import urllib.request

from conftest import REPO, refused


def test_connection_to_the_metadata_server_is_refused_at_once():
    start = time.monotonic()
    with socket.socket() as s, refused(r"connection to 169\.254\.169\.254:80 refused"):
        s.connect(("169.254.169.254", 80))
    with refused(r"name lookup of 'metadata\.google\.internal' refused"):
        urllib.request.urlopen("http://metadata.google.internal/computeMetadata/v1/", timeout=30)
    with socket.socket(socket.AF_INET6) as s, refused(r"connection to \[2001:db8::1\]:443 refused"):
        s.connect_ex(("2001:db8::1", 443))
    assert time.monotonic() - start < 1


def test_loopback_still_works():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5):
            server.accept()[0].close()


def test_a_test_that_swallows_the_refusal_still_fails(pytester):
    # google-auth's metadata probe catches every error and carries on: the test must fail anyway.
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_inner="""
        import socket

        def test_probe_swallowed():
            try:
                socket.create_connection(("169.254.169.254", 80), timeout=30)
            except Exception:
                pass

        def test_loopback_only():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*_ test_probe_swallowed _*", "*connection to 169.254.169.254:80 refused*"])
