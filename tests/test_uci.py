"""packaging/openwrt/uci2json.py: UCI text in, mpudp JSON out, bad values named.

Each JSON it writes for a good section is run through `mpudp.py --check` in a
subprocess, as the init script does before it lets a daemon read it.
"""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

import mpudp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UCI2JSON = os.path.join(ROOT, "packaging", "openwrt", "uci2json.py")
MPUDP = os.path.join(ROOT, "mpudp.py")
TEMPLATE = os.path.join(ROOT, "packaging", "openwrt", "mpudp.config")
TIMEOUT_S = 60

sys.path.insert(0, os.path.dirname(UCI2JSON))
import uci2json  # noqa: E402


def keys():
    private = mpudp.generate_private_key()
    return mpudp.encode_key(private), mpudp.encode_key(mpudp.public_key(private))


def run(tmp_path, uci_text, *argv):
    """uci2json.py on `uci_text`: (exit status, stdout, stderr)."""
    uci = tmp_path / "mpudp"
    uci.write_text(uci_text)
    proc = subprocess.run([sys.executable, UCI2JSON, "--uci", str(uci), "--run-dir", "/var/run/mpudp"]
                          + list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stdout, proc.stderr


def convert(tmp_path, uci_text, name, *options):
    """Section `name` as JSON: (the parsed JSON, the launch line); fails the test on errors."""
    out = tmp_path / (name + ".json")
    code, stdout, stderr = run(tmp_path, uci_text, *(list(options) + ["convert", name, str(out)]))
    assert code == 0, stderr
    assert stderr == ""
    return json.loads(out.read_text()), stdout.strip()


def refused(tmp_path, uci_text, name="x"):
    """The error lines for section `name`; asserts nothing was written."""
    out = tmp_path / "refused.json"
    code, stdout, stderr = run(tmp_path, uci_text, "convert", name, str(out))
    assert code == 2 and stdout == "", (code, stdout, stderr)
    assert not out.exists()
    return stderr.strip().splitlines()


def check(path):
    return subprocess.run([sys.executable, MPUDP, "-config=%s" % path, "--check"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=TIMEOUT_S)


def client_uci(tmp_path, extra=""):
    client_private, _ = keys()
    _, server_public = keys()
    key_file = tmp_path / "client.key"
    key_file.write_text("Private Key (Base64): %s\nPublic Key (Base64): ignored\n" % client_private)
    return (
        "config mpudp 'client'\n"
        "\toption enabled '1'\n"
        "\toption mode 'client'\n"
        "\toption listen_addr '127.0.0.1:8999'\n"
        "\tlist link '127.0.0.1:5000'\n"
        "\tlist link \"[::1]:5000 priority 20\"   # a comment\n"
        "\toption client_private_key_file '%s'\n"
        "\toption server_public_key '%s'\n"
        "\toption heartbeat_interval_sec '0.5'\n"
        "\toption max_consecutive_fail '4'\n"
        "\toption redundancy 'auto'\n"
        "\toption debug 'on'\n%s" % (key_file, server_public, extra)), client_private, server_public


def server_uci(tmp_path):
    server_private, _ = keys()
    publics = [keys()[1], keys()[1]]
    key_file = tmp_path / "server.key"
    key_file.write_text(server_private + "\n")
    return (
        "package mpudp\n\n"
        "config mpudp 'srv'\n"
        "\toption mode server\n"
        "\toption listen_addr ':5000'\n"
        "\toption upstream_addr '127.0.0.1:6000'\n"
        "\tlist upstream_addrs '127.0.0.1:6001'\n"
        "\toption server_private_key_file %s\n"
        "\tlist client_public_key '%s'\n"
        "\tlist client_public_key '%s'\n"
        "\toption status_file '/tmp/s.json'\n"
        "\toption session_timeout_sec '60'\n" % (key_file, publics[0], publics[1])), server_private, publics


# -- good sections -------------------------------------------------------------


def test_client_section_becomes_the_json_mpudp_reads(tmp_path):
    text, client_private, server_public = client_uci(tmp_path)
    config, launch = convert(tmp_path, text, "client", "--kernel", "6.6.0")
    assert config == {"mode": "client", "client": {
        "listen_addr": "127.0.0.1:8999",
        "links": [{"remote_addr": "127.0.0.1:5000"}, {"remote_addr": "[::1]:5000", "priority": 20}],
        "client_private_key": client_private, "server_public_key": server_public,
        "heartbeat_interval_sec": 0.5, "max_consecutive_fail": 4, "redundancy": "auto", "debug": True,
        "log_target": "syslog", "score_file": "/var/run/mpudp/client/status.json"}}
    assert launch == "mpudp"  # the default user, no capability needed
    result = check(tmp_path / "client.json")
    assert result.returncode == 0 and "config OK" in result.stdout, result.stdout
    assert "readable by other users" not in result.stdout


def test_server_section_with_key_file_and_lists(tmp_path):
    text, server_private, publics = server_uci(tmp_path)
    config, launch = convert(tmp_path, text, "srv")
    body = config["server"]
    assert config["mode"] == "server"
    assert body["server_private_key"] == server_private
    assert body["client_public_keys"] == publics  # in order: the index is the client_id
    assert body["upstream_addrs"] == ["127.0.0.1:6001"]
    assert body["status_file"] == "/tmp/s.json" and body["session_timeout_sec"] == 60
    result = check(tmp_path / "srv.json")
    assert result.returncode == 0 and "config OK" in result.stdout, result.stdout


def test_written_atomically_with_mode_600(tmp_path):
    text, _, _ = client_uci(tmp_path)
    out = tmp_path / "client.json"
    out.write_text("old")
    os.chmod(str(out), 0o644)
    convert(tmp_path, text, "client")
    assert stat.S_IMODE(os.stat(str(out)).st_mode) == 0o600
    assert json.loads(out.read_text())["mode"] == "client"
    assert sorted(os.listdir(str(tmp_path))) == ["client.json", "client.key", "mpudp"]  # no temp file left


def test_link_words(tmp_path):
    text, _, _ = client_uci(tmp_path, "\tlist link '192.0.2.1:7000 dev wwan0 mark 0x64 from 192.0.2.7 priority 2.5'\n")
    config, _ = convert(tmp_path, text, "client", "--kernel", "6.6.0")
    assert config["client"]["links"][2] == {"remote_addr": "192.0.2.1:7000", "bind_interface": "wwan0",
                                            "fwmark": 100, "bind_addr": "192.0.2.7", "priority": 2.5}


def test_uci_quoting(tmp_path):
    sections = uci2json.parse_uci(
        "config mpudp 'a'\n"
        "  option score_file '/tmp/it'\\''s.json'\n"
        "  option listen_addr \"127.0.0.1:1\" # trailing comment\n"
        "# option debug '1'\n"
        "  list link 'x:1'\n  list link 'y:2'\n")
    assert sections[0].options == {"score_file": "/tmp/it's.json", "listen_addr": "127.0.0.1:1"}
    assert sections[0].lists == {"link": ["x:1", "y:2"]}


def test_a_section_may_name_a_json_file(tmp_path):
    text, _, _ = client_uci(tmp_path)
    client, _ = convert(tmp_path, text, "client")
    named = tmp_path / "named.json"
    named.write_text(json.dumps(client))
    config, launch = convert(tmp_path, "config mpudp 'j'\n\toption config '%s'\n\toption user 'root'\n" % named, "j")
    assert config == client and launch == "root"


def test_template_parses_and_its_sections_are_disabled(tmp_path):
    with open(TEMPLATE) as f:
        text = f.read()
    code, stdout, stderr = run(tmp_path, text, "sections")
    assert code == 0 and stdout == "" and stderr == ""
    names = [s.name for s in uci2json.parse_uci(text)]
    assert names == ["client", "server", "json"]


def test_sections_lists_the_enabled_ones(tmp_path):
    text = ("config mpudp 'a'\n\toption enabled '1'\n"
            "config mpudp 'b'\n\toption enabled '0'\n"
            "config mpudp 'c'\n"  # enabled unless it says not
            "config mpudp 'd'\n\toption enabled 'maybe'\n"
            "config mpdup 'e'\n")
    code, stdout, stderr = run(tmp_path, text, "sections")
    assert stdout.split() == ["a", "c", "d"]  # d is named, so a running d is kept; its convert fails
    assert code == 2
    assert "mpudp.d.enabled: 'maybe' is not a boolean" in stderr
    assert "config mpdup: unknown section type" in stderr


def test_sections_of_an_unreadable_file_exit_1(tmp_path):
    code, stdout, stderr = run(tmp_path, "config mpudp 'a\n", "sections")
    assert code == 1 and stdout == "" and "mpudp:1:" in stderr


# -- bad values, each named ----------------------------------------------------


@pytest.mark.parametrize("lines, expected", [
    ("option mode 'client'\n option heartbeat_interval_sec 'fast'",
     "mpudp.x.heartbeat_interval_sec: 'fast' is not a number"),
    ("option mode 'client'\n option max_consecutive_fail '2.5'",
     "mpudp.x.max_consecutive_fail: '2.5' is not a whole number"),
    ("option mode 'client'\n option loss_weight 'nan'", "mpudp.x.loss_weight: 'nan' is not a number"),
    ("option mode 'client'\n option debug 'sometimes'", "mpudp.x.debug: 'sometimes' is not a boolean"),
    ("option mode 'client'\n option redundancy 'all'", "mpudp.x.redundancy: 'all' is not a whole number"),
    ("option mode 'client'\n list link '1.2.3.4:5 prio 3'",
     "mpudp.x.link '1.2.3.4:5 prio 3': unknown word 'prio'; did you mean 'priority'?"),
    ("option mode 'client'\n list link '1.2.3.4:5 dev'", "mpudp.x.link '1.2.3.4:5 dev': 'dev' needs a value"),
    ("option mode 'client'\n list link '1.2.3.4:5 mark red'", "mpudp.x.link '1.2.3.4:5 mark red': mark 'red'"),
    ("option mode 'client'\n list link '1.2.3.4:5 dev a dev b'", "'dev' given twice"),
    ("option mode 'client'\n option scor_file '/x'",
     "mpudp.x.scor_file: not an option of a client; did you mean 'score_file'?"),
    ("option mode 'server'\n option score_file '/x'", "mpudp.x.score_file: not an option of a server"),
    ("option mode 'client'\n list listen_addr 'a:1'", "mpudp.x.listen_addr: is a list"),
    ("option listen_addr ':1'", "mpudp.x.mode: is required"),
    ("option mode 'relay'", "mpudp.x.mode: must be 'client' or 'server'"),
    ("option mode 'client'\n option user 'Bad User'", "mpudp.x.user: 'Bad User' is not a user name"),
    ("option mode 'client'\n option client_private_key 'a'\n option client_private_key_file '/k'",
     "mpudp.x.client_private_key: give client_private_key or client_private_key_file, not both"),
    ("option mode 'client'\n option client_private_key_file '/nonexistent/key'",
     "mpudp.x.client_private_key_file: cannot read /nonexistent/key"),
    ("option config '/nonexistent.json'", "mpudp.x.config: cannot read /nonexistent.json"),
    ("option config '/x.json'\n option listen_addr ':1'", "mpudp.x.listen_addr: not used with option config"),
])
def test_bad_value_is_named(tmp_path, lines, expected):
    errors = refused(tmp_path, "config mpudp 'x'\n %s\n" % lines)
    assert any(expected in line for line in errors), errors


def test_every_bad_option_is_named_at_once(tmp_path):
    errors = refused(tmp_path, "config mpudp 'x'\n option mode client\n option rtt_weight a\n option debug b\n")
    assert len(errors) == 2 and "rtt_weight" in errors[0] and "debug" in errors[1], errors


def test_key_file_without_a_key(tmp_path):
    key = tmp_path / "k"
    key.write_text("hello: world\nsecond line\n")
    errors = refused(tmp_path, "config mpudp 'x'\n option mode client\n option server_public_key_file '%s'\n" % key)
    assert errors == ["mpudp.x.server_public_key_file: %s holds no public key"
                      " (one line of base64, or what keygen.py prints)" % key]


def test_a_section_name_that_cannot_name_a_file(tmp_path):
    code, _, stderr = run(tmp_path, "config mpudp '../etc'\n option mode client\n", "sections")
    assert code == 2 and "needs a name of letters, digits and _" in stderr


def test_what_mpudp_check_refuses_passes_the_converter_and_is_named_by_check(tmp_path):
    """Ranges and keys are mpudp.py's to judge: the converter writes, --check names the key."""
    config, _ = convert(tmp_path, "config mpudp 'x'\n option mode client\n option listen_addr '127.0.0.1:1'\n"
                                  " list link '127.0.0.1:2'\n option client_private_key 'x'\n"
                                  " option server_public_key 'y'\n option heartbeat_interval_sec '0.001'\n", "x")
    result = check(tmp_path / "x.json")
    assert result.returncode == 2
    for key in ("client.client_private_key", "client.server_public_key", "client.heartbeat_interval_sec"):
        assert key in result.stdout, result.stdout


# -- capabilities --------------------------------------------------------------


@pytest.mark.parametrize("config, kernel, expected", [
    ({"mode": "client", "client": {"listen_addr": "127.0.0.1:8999", "links": [{"remote_addr": "a:1"}]}}, "6.6.0", []),
    ({"mode": "client", "client": {"links": [{"remote_addr": "a:1", "fwmark": 100}]}}, "6.6.0", ["CAP_NET_ADMIN"]),
    ({"mode": "client", "client": {"links": [{"remote_addr": "a:1", "fwmark": "0x0"}]}}, "6.6.0", []),
    ({"mode": "client", "client": {"links": [{"remote_addr": "a:1", "bind_interface": "eth1"}]}}, "5.4.200", ["CAP_NET_RAW"]),
    ({"mode": "client", "client": {"links": [{"remote_addr": "a:1", "bind_interface": "eth1"}]}}, "5.7.0", []),
    ({"mode": "client", "client": {"links": [{"remote_addr": "a:1", "bind_addr": "[::1]:443"}]}}, "6.1", ["CAP_NET_BIND_SERVICE"]),
    ({"mode": "client", "client": {"links": [{"remote_addr": "a:1", "bind_addr": "2001:db8::7"}]}}, "6.1", []),
    ({"mode": "server", "server": {"listen_addr": ":53"}}, "6.6.0", ["CAP_NET_BIND_SERVICE"]),
    ({"mode": "server", "server": {"listen_addr": ":5000", "links": [{"fwmark": 1}]}}, "6.6.0", []),
])
def test_capabilities(config, kernel, expected):
    assert uci2json.capabilities(config, kernel) == expected


def test_convert_prints_user_and_capabilities(tmp_path):
    text, _, _ = client_uci(tmp_path, "\toption user 'relay'\n\tlist link '192.0.2.1:7000 dev eth1 mark 7'\n")
    _, launch = convert(tmp_path, text, "client", "--kernel", "5.4.0")
    assert launch == "relay CAP_NET_ADMIN CAP_NET_RAW"


# -- bytecode --------------------------------------------------------------------


def test_bytecode_is_written_when_missing_or_stale_and_only_then(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("X = 1\n")
    cache = tmp_path / "__pycache__" / os.path.basename(__import__("importlib.util").util.cache_from_source(str(source)))
    assert uci2json.ensure_bytecode(str(source)) is True
    assert cache.is_file()
    assert uci2json.ensure_bytecode(str(source)) is False  # fresh: not rewritten
    source.write_text("X = 22\n")  # another size (and maybe the same second)
    past = time.time() - 100
    os.utime(str(source), (past, past))
    assert uci2json.ensure_bytecode(str(source)) is True
    sys.path.insert(0, str(tmp_path))
    try:
        import mod
        assert mod.X == 22 and mod.__cached__ == str(cache)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mod", None)


def test_bytecode_option_with_a_command(tmp_path):
    source = tmp_path / "mpudp_copy.py"
    source.write_text("Y = 2\n")
    code, stdout, stderr = run(tmp_path, "", "--bytecode", str(source), "sections")
    assert code == 0 and stderr == ""
    assert os.listdir(str(tmp_path / "__pycache__"))
