"""mpudp.py and keygen.py use the standard library only, nothing OpenWrt's python3-light
lacks, and importing mpudp has no side effects."""

import ast
import json
import os
import subprocess
import sys

import pytest

from conftest import KEYGEN, MPUDP, ROOT

# Modules that OpenWrt ships outside python3-light (or not at all).
FORBIDDEN = frozenset([
    "logging", "asyncio", "ctypes", "urllib", "email", "http", "xml", "sqlite3", "unittest",
    "multiprocessing", "decimal", "lzma", "uuid", "ssl", "_hashlib", "curses", "readline", "dbm",
    "pydoc", "venv", "cgi", "cgitb", "unicodedata",
])

# Forbidden modules the standard library imports only if present, inside
# try/except ImportError: hashlib and hmac try `_hashlib` (OpenSSL) and fall back
# to built-ins; shutil (imported by argparse on Python 3.8 and 3.9) tries `lzma`.
# The blocked-import test below proves mpudp works without them.
OPTIONAL_IN_STDLIB = frozenset(["_hashlib", "lzma"])

LOCAL_MODULES = frozenset(["mpudp", "keygen"])


def imported_modules(path):
    """Top-level names of every module imported anywhere in the file (also inside functions)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in a one-file program"
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", [MPUDP, KEYGEN], ids=["mpudp.py", "keygen.py"])
def test_no_forbidden_imports(path):
    names = imported_modules(path)
    assert names, "the parser found no imports at all"
    assert not names & FORBIDDEN, sorted(names & FORBIDDEN)


@pytest.mark.parametrize("path", [MPUDP, KEYGEN], ids=["mpudp.py", "keygen.py"])
def test_only_standard_library_imports(path):
    if not hasattr(sys, "stdlib_module_names"):
        pytest.skip("sys.stdlib_module_names needs Python 3.10+ (the forbidden list is still checked)")
    names = imported_modules(path) - LOCAL_MODULES
    outside = sorted(n for n in names if n not in sys.stdlib_module_names)
    assert outside == []


def test_keygen_imports_only_mpudp_locally():
    assert imported_modules(KEYGEN) & LOCAL_MODULES == {"mpudp"}


def test_parser_sees_lazy_imports():
    # The syslog import sits inside Log.__init__; the walk must find it, or the
    # checks above would miss lazy imports.
    assert "syslog" in imported_modules(MPUDP)


def run_python(code, cwd=ROOT, no_site=False):
    """`python -c code`; no_site (-S) keeps .pth files of the test machine from loading modules."""
    args = [sys.executable] + (["-S"] if no_site else []) + ["-c", code]
    return subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          cwd=cwd, timeout=60)


def test_import_prints_nothing():
    result = run_python("import mpudp")
    assert result.returncode == 0
    assert result.stdout == ""
    assert result.stderr == ""


def test_import_opens_no_socket_starts_no_thread_sets_no_signal():
    code = r"""
import json, signal, socket, sys, threading
opened = []
real_socket, real_socketpair = socket.socket, socket.socketpair
class Spy(real_socket):
    def __init__(self, *args, **kwargs):
        opened.append("socket")
        real_socket.__init__(self, *args, **kwargs)
def spy_pair(*args, **kwargs):
    opened.append("socketpair")
    return real_socketpair(*args, **kwargs)
socket.socket, socket.socketpair = Spy, spy_pair
handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
threads = threading.active_count()
sys.path.insert(0, %r)
import mpudp
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the spy itself works
probe.close()
wakeup = signal.set_wakeup_fd(-1)
print(json.dumps({
    "opened": opened,
    "threads": threading.active_count() - threads,
    "signals_changed": [int(s) for s, h in handlers.items() if signal.getsignal(s) is not h],
    "wakeup_fd": wakeup,
}))
""" % ROOT
    result = run_python(code, cwd=os.path.dirname(ROOT))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert report == {"opened": ["socket"], "threads": 0, "signals_changed": [], "wakeup_fd": -1}


def test_import_pulls_in_no_forbidden_module():
    code = ("import sys, json\nbefore = sorted(sys.modules)\nsys.path.insert(0, %r)\nimport mpudp, keygen\n"
            "print(json.dumps([before, sorted(sys.modules)]))" % ROOT)
    result = run_python(code, no_site=True)
    assert result.returncode == 0, result.stderr
    before, after = [set(names) for names in json.loads(result.stdout)]
    assert not before & FORBIDDEN  # the interpreter itself did not load any
    assert "mpudp" in after
    assert sorted(after & (FORBIDDEN - OPTIONAL_IN_STDLIB)) == []


BLOCKER = r"""
import json, sys
BLOCKED = set(%r)
already = sorted(BLOCKED & set(sys.modules))
class Block(object):  # a meta path finder (importlib.abc itself would load urllib and lzma)
    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED or name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError("No module named %%r (blocked)" %% name, name=name)
        return None
sys.meta_path.insert(0, Block())
sys.path.insert(0, %r)
"""


def test_core_works_with_the_forbidden_modules_missing():
    """As on python3-light: every forbidden module fails to import; mpudp and keygen still
    import, and crypto, packets, config parsing and the reactor work."""
    code = BLOCKER % (sorted(FORBIDDEN), ROOT) + r"""
import mpudp, keygen
private = mpudp.generate_private_key()
server_private = mpudp.generate_private_key()
secret = mpudp.static_secret(private, mpudp.public_key(server_private), mpudp.public_key(private),
                             mpudp.public_key(server_private))
client = mpudp.Epoch(secret, b"\1" * 16, b"\2" * 16, True)
server = mpudp.Epoch(secret, b"\1" * 16, b"\2" * 16, False)
packet = mpudp.seal(client.tx_mac, mpudp.TYPE_DATA, 0, 0, 1, client.next_nonce(), b"x")
assert mpudp.verify(server.rx_mac, packet, len(packet))
config = mpudp.parse_config({"mode": "client", "client": {
    "listen_addr": "127.0.0.1:0", "links": [{"remote_addr": "127.0.0.1:9"}],
    "client_private_key": mpudp.encode_key(private),
    "server_public_key": mpudp.encode_key(mpudp.public_key(server_private))}})
assert config.section.static_secret == secret
reactor = mpudp.Reactor()
fired = []
reactor.call_later(0, fired.append, 1)
reactor.run_once(0)
assert fired == [1]
resolver = mpudp.Resolver(reactor)
resolver.close()
reactor.close()
print(json.dumps({"already": already, "loaded": sorted(BLOCKED & set(sys.modules))}))
"""
    result = run_python(code, no_site=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report == {"already": [], "loaded": []}


# python3-light has neither the idna codec (python3-codecs) nor unicodedata
# (python3-unicodedata), and CPython's getaddrinfo() encodes every str host with
# the idna codec: LookupError("unknown encoding: idna"), even for "127.0.0.1".
NO_IDNA = sorted(FORBIDDEN | {"encodings.idna", "stringprep"})


def test_the_light_simulation_breaks_str_getaddrinfo():
    """The premise of the next test: blocking the codec reproduces python3-light's failure."""
    code = BLOCKER % (NO_IDNA, ROOT) + r"""
import socket
try:
    socket.getaddrinfo("127.0.0.1", 9, 0, socket.SOCK_DGRAM)
    print("no error")
except LookupError as exc:
    print("LookupError", exc)
print(socket.getaddrinfo(b"127.0.0.1", 9, 0, socket.SOCK_DGRAM)[0][4])
"""
    result = run_python(code, no_site=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["LookupError unknown encoding: idna", "('127.0.0.1', 9)"]


def test_addresses_work_without_the_idna_codec(tmp_path):
    """Literal addresses and ASCII names must not need the codec: before the fix,
    numeric_address() raised LookupError, so client and server crashed at start and
    --check printed a traceback on python3-light."""
    config_path = str(tmp_path / "config.json")
    code = BLOCKER % (NO_IDNA, ROOT) + r"""
import socket
import mpudp
assert mpudp.numeric_address("127.0.0.1", 9) == (socket.AF_INET, ("127.0.0.1", 9))
assert mpudp.numeric_address("host.example", 9) is None
assert mpudp.listen_address("127.0.0.1", 0) == (socket.AF_INET, ("127.0.0.1", 0))
import time
reactor = mpudp.Reactor()
resolver = mpudp.Resolver(reactor)  # its default getaddrinfo, on a worker thread
results = []
resolver.lookup("k", "127.0.0.1", 9, results.append)
deadline = time.monotonic() + 10
while not results and time.monotonic() < deadline:
    reactor.run_once(0.05)
assert results == [(socket.AF_INET, ("127.0.0.1", 9))], results
resolver.close()
reactor.close()
private, server_private = mpudp.generate_private_key(), mpudp.generate_private_key()
with open(%r, "w") as f:
    json.dump({"mode": "client", "client": {
        "listen_addr": "127.0.0.1:0", "links": [{"remote_addr": "127.0.0.1:9"}, {"remote_addr": "relay.example:9"}],
        "client_private_key": mpudp.encode_key(private),
        "server_public_key": mpudp.encode_key(mpudp.public_key(server_private))}}, f)
status = mpudp.main(["-config=%s", "--check"])
sys.stdout.flush()
print(json.dumps({"status": status}))
""" % (config_path, config_path)
    result = run_python(code, no_site=True)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0
    assert json.loads(result.stdout.splitlines()[-1]) == {"status": 0}
    assert "config OK" in result.stdout
