"""Deployment files: the OpenWrt procd init script, the systemd unit and install.sh.

The init script runs in a fake procd: a harness defines procd_open_instance,
procd_set_param, procd_close_instance, procd_send_signal and logger as shell
functions that record their arguments, sources the script and calls one of
its functions.  Its config check runs the repo's mpudp.py for real.
"""

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

import mpudp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGING = os.path.join(ROOT, "packaging")
INIT = os.path.join(PACKAGING, "openwrt", "mpudp.init")
UNIT = os.path.join(PACKAGING, "systemd", "mpudp@.service")
INSTALL = os.path.join(PACKAGING, "install.sh")
MPUDP = os.path.join(ROOT, "mpudp.py")
KEYGEN = os.path.join(ROOT, "keygen.py")
TIMEOUT_S = 60


def available_shells():
    """Each POSIX shell found here, as a pytest param: sh always, dash and busybox ash if installed."""
    shells = [pytest.param(["sh"], id="sh")]
    for argv, name in ((["dash"], "dash"), (["busybox", "sh"], "busybox")):
        if shutil.which(argv[0]):
            shells.append(pytest.param(argv, id=name))
        else:
            shells.append(pytest.param(argv, id=name, marks=pytest.mark.skip(reason="%s is not installed" % name)))
    return shells


SHELLS = available_shells()


def clean_env(**extra):
    """The environment less MPUDP_* (tox passes them on), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPUDP_")}
    env.update(extra)
    return env


def keys():
    private = mpudp.generate_private_key()
    return mpudp.encode_key(private), mpudp.encode_key(mpudp.public_key(private))


def write(path, text, mode=0o600):
    with open(str(path), "w") as f:
        f.write(text)
    os.chmod(str(path), mode)
    return str(path)


def good_config(directory, name="config.json"):
    """A valid server config (nothing listens: only --check reads it)."""
    server_private, _ = keys()
    _, client_public = keys()
    return write(os.path.join(str(directory), name), (
        '{"mode": "server", "server": {"listen_addr": "127.0.0.1:5000", "upstream_addr": "127.0.0.1:6000",'
        ' "server_private_key": "%s", "client_public_keys": ["%s"]}}' % (server_private, client_public)))


def client_config(directory, name="client.json"):
    """A valid client config with literal addresses (its --check looks each one up)."""
    client_private, _ = keys()
    _, server_public = keys()
    return write(os.path.join(str(directory), name), (
        '{"mode": "client", "client": {"listen_addr": "127.0.0.1:8999", "links": [{"remote_addr": "127.0.0.1:5000"},'
        ' {"remote_addr": "[::1]:5000"}], "client_private_key": "%s", "server_public_key": "%s"}}'
        % (client_private, server_public)))


# -- the OpenWrt init script in a fake procd ---------------------------------

HARNESS = r"""
# A fake /etc/rc.common + /lib/functions/procd.sh: every procd call and logger
# line is recorded to $RECORD as its arguments, tab-separated.
record() {
	printf '%s' "$1" >> "$RECORD"
	shift
	for arg in "$@"; do printf '\t%s' "$arg" >> "$RECORD"; done
	printf '\n' >> "$RECORD"
}
procd_open_instance() { record procd_open_instance "$@"; }
procd_set_param() { record procd_set_param "$@"; }
procd_append_param() { record procd_append_param "$@"; }
procd_close_instance() { record procd_close_instance "$@"; }
procd_send_signal() { record procd_send_signal "$@"; }
logger() { record logger "$@"; }
initscript=/etc/init.d/mpudp
. "$INIT"
"$@"
"""


class FakeProcd:
    def __init__(self, tmp_path, shell=("sh",)):
        self.dir = tmp_path
        self.shell = list(shell)
        self.harness = write(tmp_path / "harness.sh", HARNESS, 0o644)
        self.record = str(tmp_path / "record")

    def run(self, *command, **env):
        """Source the init script and run `command`; (exit status, stderr, recorded calls)."""
        if os.path.exists(self.record):
            os.remove(self.record)
        defaults = {"MPUDP_PYTHON": sys.executable, "MPUDP_PROG": MPUDP}
        defaults.update(env)
        proc = subprocess.run(
            self.shell + [self.harness] + list(command), cwd=str(self.dir), timeout=TIMEOUT_S,
            env=clean_env(RECORD=self.record, INIT=INIT, **defaults),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        calls = []
        if os.path.exists(self.record):
            with open(self.record) as f:
                calls = [line.rstrip("\n").split("\t") for line in f]
        return proc.returncode, proc.stdout + proc.stderr, calls


def params(calls):
    """{param type: [values]} of the procd_set_param calls."""
    return {call[1]: call[2:] for call in calls if call[0] == "procd_set_param"}


def logged(calls):
    return "\n".join(" ".join(call[1:]) for call in calls if call[0] == "logger")


@pytest.mark.parametrize("argv", [["sh", "-n"], ["dash", "-n"], ["busybox", "sh", "-n"]],
                         ids=["sh", "dash", "busybox"])
@pytest.mark.parametrize("script", [INIT, INSTALL], ids=["init", "install.sh"])
def test_shell_syntax(argv, script):
    if not shutil.which(argv[0]):
        pytest.skip("%s is not installed" % argv[0])
    proc = subprocess.run(argv + [script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout


def test_init_script_header_and_defaults(tmp_path):
    with open(INIT) as f:
        text = f.read()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    for line in ("START=95", "STOP=10", "USE_PROCD=1"):
        assert re.search(r"^%s$" % line, text, re.M), line
    # With no override, the paths are the documented ones.
    procd = FakeProcd(tmp_path)
    code, out, _ = procd.run("eval", 'echo "$PYTHON|$PROG|$CONFIG"', MPUDP_PYTHON="", MPUDP_PROG="")
    assert code == 0, out
    assert out.strip() == "/usr/bin/python3|/usr/share/mpudp/mpudp.py|/etc/mpudp/config.json"


@pytest.mark.parametrize("shell", SHELLS)
def test_start_service_opens_a_respawning_logged_instance(tmp_path, shell):
    config = good_config(tmp_path)
    code, out, calls = FakeProcd(tmp_path, shell).run("start_service", MPUDP_CONFIG=config)
    assert code == 0, out
    names = [call[0] for call in calls]
    assert names[0] == "procd_open_instance" and names[-1] == "procd_close_instance", calls
    assert "logger" not in names, calls
    p = params(calls)
    assert p["command"] == [sys.executable, MPUDP, "-config=%s" % config]
    assert len(p["respawn"]) == 3 and all(v.isdigit() for v in p["respawn"]), p["respawn"]
    assert p["stdout"] == ["1"] and p["stderr"] == ["1"]
    assert p["file"] == [config]
    assert p["limits"] == ["nofile=65536 65536"]


@pytest.mark.parametrize("shell", SHELLS)
def test_start_service_refuses_invalid_json_without_an_instance(tmp_path, shell):
    config = write(tmp_path / "config.json", '{"mode": "server", ')
    code, out, calls = FakeProcd(tmp_path, shell).run("start_service", MPUDP_CONFIG=config)
    assert code != 0
    assert not [call for call in calls if call[0].startswith("procd_")], calls
    log = logged(calls)
    assert "-p daemon.err" in log and "-t mpudp" in log
    assert "start refused: %s failed the check (exit 2)" % config in log
    assert "not valid JSON" in log
    assert "not valid JSON" in out  # and on the terminal of whoever ran it


def test_start_service_logs_each_bad_key_on_its_own_line(tmp_path):
    config = write(tmp_path / "config.json", (
        '{"mode": "client", "client": {"listen_addr": "127.0.0.1:8999", "links": [{"remote_addr": "nowhere"}],'
        ' "client_private_key": "x", "server_public_key": "y"}}'))
    code, out, calls = FakeProcd(tmp_path).run("start_service", MPUDP_CONFIG=config)
    assert code != 0
    assert "procd_open_instance" not in [call[0] for call in calls]
    lines = [call for call in calls if call[0] == "logger"]
    for key in ("client.links[0].remote_addr", "client.client_private_key", "client.server_public_key"):
        assert sum(1 for line in lines if key in line[-1]) == 1, (key, lines)


def test_start_service_says_when_python_is_missing(tmp_path):
    config = good_config(tmp_path)
    missing = str(tmp_path / "no-such-python3")
    code, out, calls = FakeProcd(tmp_path).run("start_service", MPUDP_CONFIG=config, MPUDP_PYTHON=missing)
    assert code != 0
    assert "procd_open_instance" not in [call[0] for call in calls]
    assert "(exit 127)" in logged(calls) and "opkg install python3-light" in logged(calls)


@pytest.mark.parametrize("shell", SHELLS)
def test_reload_service_sends_hup(tmp_path, shell):
    config = good_config(tmp_path)
    code, out, calls = FakeProcd(tmp_path, shell).run("reload_service", MPUDP_CONFIG=config)
    assert code == 0, out
    signals = [call for call in calls if call[0] == "procd_send_signal"]
    assert len(signals) == 1, calls
    service, rest = signals[0][1], signals[0][2:]
    assert service == "mpudp"
    # No signal named means SIGHUP to procd; a named one must be HUP for every instance.
    assert rest in ([], ["*", "HUP"], ["*", "1"]), rest


def test_reload_service_refuses_a_bad_config(tmp_path):
    config = write(tmp_path / "config.json", "not json")
    code, out, calls = FakeProcd(tmp_path).run("reload_service", MPUDP_CONFIG=config)
    assert code != 0
    assert "procd_send_signal" not in [call[0] for call in calls]
    assert "reload refused" in logged(calls)


def test_check_and_status_commands(tmp_path):
    config = good_config(tmp_path)
    procd = FakeProcd(tmp_path)
    code, out, _ = procd.run("check", MPUDP_CONFIG=config)
    assert code == 0 and "config OK" in out, out
    # Not running, and no status_file set: mpudp --status says so, exit 3 (LSB "not running").
    code, out, _ = procd.run("status_service", MPUDP_CONFIG=config)
    assert code == 3 and "status_file" in out, out


# -- systemd -----------------------------------------------------------------


def unit_directives(path=UNIT):
    """{(section, key): [values]} of a unit file; comments and blank lines skipped."""
    found = {}
    section = None
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            found.setdefault((section, key.strip()), []).append(value.strip())
    return found


def test_unit_directives():
    d = unit_directives()

    def one(key, section="Service"):
        values = d.get((section, key))
        assert values and len(values) == 1, (key, values)
        return values[0]

    assert one("Type") == "simple"
    start = one("ExecStart").split()
    assert start == ["/usr/bin/python3", "/usr/share/mpudp/mpudp.py", "-config=/etc/mpudp/%i.json"]
    assert one("ExecStartPre").split() == start + ["--check"]
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert "2" in one("RestartPreventExitStatus").split()
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("MemoryDenyWriteExecute") == "yes"
    assert one("CapabilityBoundingSet") == ""
    assert ("Service", "AmbientCapabilities") not in d  # only as a comment, for who needs it
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert one("SystemCallFilter") == "@system-service"
    assert one("LimitNOFILE") == "65536"
    assert one("User") == "mpudp"
    assert one("RuntimeDirectory") == "mpudp/%i"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces", "LockPersonality"):
        assert one(key) == "yes", key
    # RestartPreventExitStatus= sees only the main process: a failing ExecStartPre= is bounded by these.
    assert int(one("StartLimitBurst", "Unit")) <= 10
    assert one("WantedBy", "Install") == "multi-user.target"


def test_unit_and_init_script_run_the_same_files():
    start = unit_directives()[("Service", "ExecStart")][0].split()
    with open(INIT) as f:
        init = f.read()
    assert 'PYTHON="${MPUDP_PYTHON:-%s}"' % start[0] in init
    assert 'PROG="${MPUDP_PROG:-%s}"' % start[1] in init


def systemd_analyze(*args):
    return subprocess.run(["systemd-analyze"] + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=TIMEOUT_S)


@pytest.fixture
def unit_copy(tmp_path):
    """The unit in a temp dir, its interpreter and daemon pointed at files that exist here;
    skips unless systemd-analyze verifies a trivial unit in this container."""
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    trivial = write(tmp_path / "trivial.service", "[Service]\nExecStart=%s -c pass\n" % sys.executable, 0o644)
    probe = systemd_analyze("verify", trivial)
    if probe.returncode != 0:
        pytest.skip("systemd-analyze verify does not work here: %s" % probe.stdout.strip()[-300:])
    with open(UNIT) as f:
        text = f.read()
    text = text.replace("/usr/bin/python3", sys.executable).replace("/usr/share/mpudp/mpudp.py", MPUDP)
    write(tmp_path / "mpudp@.service", text, 0o644)
    return str(tmp_path / "mpudp@test.service")


def test_systemd_analyze_verify(unit_copy):
    result = systemd_analyze("verify", unit_copy)
    ours = [line for line in result.stdout.splitlines() if "mpudp@" in line]
    assert result.returncode == 0 and not ours, result.stdout


def test_systemd_analyze_security(unit_copy):
    result = systemd_analyze("security", "--offline=yes", unit_copy)
    found = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    if result.returncode != 0 or not found:
        pytest.skip("systemd-analyze security --offline is not available: %s" % result.stdout.strip()[-300:])
    assert float(found.group(1)) <= 2.5, result.stdout


# -- install.sh --------------------------------------------------------------


def install(destdir, kind, shell=("sh",), **env):
    proc = subprocess.run(list(shell) + [INSTALL, kind], timeout=TIMEOUT_S,
                          env=clean_env(DESTDIR=str(destdir), **env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


def mode(path):
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def read(path):
    with open(str(path)) as f:
        return f.read()


@pytest.mark.parametrize("shell", SHELLS)
def test_install_openwrt(tmp_path, shell):
    root = tmp_path / "root"
    out = install(root, "openwrt", shell)
    share = root / "usr" / "share" / "mpudp"
    assert read(share / "mpudp.py") == read(MPUDP) and read(share / "keygen.py") == read(KEYGEN)
    assert mode(share / "mpudp.py") == 0o644
    assert read(root / "etc" / "init.d" / "mpudp") == read(INIT)  # default paths: nothing to substitute
    assert mode(root / "etc" / "init.d" / "mpudp") == 0o755
    assert mode(root / "etc" / "mpudp") == 0o700
    for name in ("config.json", "config.json.example"):
        assert mode(root / "etc" / "mpudp" / name) == 0o600
    assert read(root / "etc" / "mpudp" / "config.json") == read(os.path.join(ROOT, "config.json"))
    assert not (root / "etc" / "systemd").exists()
    assert "uci add firewall rule" in out and "/etc/init.d/mpudp enable" in out
    # keygen.py finds mpudp.py beside it.
    keygen = subprocess.run([sys.executable, str(share / "keygen.py")], stdout=subprocess.PIPE,
                            universal_newlines=True, timeout=TIMEOUT_S)
    assert keygen.returncode == 0 and "Public Key (Base64): " in keygen.stdout


def test_install_systemd_with_prefix(tmp_path):
    root = tmp_path / "root"
    out = install(root, "systemd", PREFIX="/opt/mpudp", PYTHON="/opt/python/bin/python3",
                  SYSTEMD_UNIT_DIR="/usr/lib/systemd/system")
    assert (root / "opt" / "mpudp" / "share" / "mpudp" / "mpudp.py").is_file()
    assert not (root / "usr" / "share").exists()
    unit = root / "usr" / "lib" / "systemd" / "system" / "mpudp@.service"
    assert mode(unit) == 0o644
    start = unit_directives(str(unit))[("Service", "ExecStart")][0].split()
    assert start == ["/opt/python/bin/python3", "/opt/mpudp/share/mpudp/mpudp.py", "-config=/etc/mpudp/%i.json"]
    assert "u mpudp " in read(root / "etc" / "sysusers.d" / "mpudp.conf")
    assert mode(root / "etc" / "mpudp") == 0o700
    assert not (root / "etc" / "init.d").exists()
    assert "systemctl enable --now mpudp@config" in out


def test_install_keeps_an_existing_config(tmp_path):
    root = tmp_path / "root"
    etc = root / "etc" / "mpudp"
    etc.mkdir(parents=True)
    os.chmod(str(etc), 0o755)
    mine = write(etc / "config.json", '{"mode": "client"}\n', 0o640)
    install(root, "openwrt")
    assert read(mine) == '{"mode": "client"}\n' and mode(mine) == 0o640
    assert mode(etc) == 0o700  # tightened: the config holds a private key
    assert (etc / "config.json.example").is_file()
    # An upgrade (a second run) keeps it too, and replaces the code.
    write(mine, '{"mode": "server"}\n')
    os.remove(str(root / "usr" / "share" / "mpudp" / "mpudp.py"))
    out = install(root, "openwrt")
    assert read(mine) == '{"mode": "server"}\n'
    assert read(root / "usr" / "share" / "mpudp" / "mpudp.py") == read(MPUDP)
    assert "kept" in out and "restarted" in out


def test_install_rejects_an_unknown_kind(tmp_path):
    proc = subprocess.run(["sh", INSTALL, "windows"], env=clean_env(DESTDIR=str(tmp_path)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode != 0 and "usage" in proc.stdout
    assert not os.listdir(str(tmp_path))


# -- what OpenWrt's python3-light holds ----------------------------------------

# Modules that OpenWrt's python3 package moves out of python3-light into
# python3-asyncio, -cgi, -codecs, -ctypes, -dbm, -decimal, -distutils, -email,
# -lib2to3, -logging, -lzma, -multiprocessing, -ncurses, -openssl, -pydoc,
# -readline, -sqlite3, -unittest, -urllib, -uuid, -venv, -webbrowser, -xml
# (lang/python/python3/files/python3-package-*.mk in openwrt/packages).
NOT_IN_LIGHT = (
    "asyncio cgi cgitb ctypes _ctypes dbm _dbm _gdbm decimal _decimal distutils email lib2to3 logging lzma _lzma"
    " multiprocessing _multiprocessing curses _curses _curses_panel _hashlib _ssl pydoc doctest pydoc_data readline"
    " sqlite3 _sqlite3 unittest urllib uuid _uuid venv webbrowser xml xmlrpc pyexpat _elementtree ensurepip idlelib"
    " tkinter _tkinter turtledemo").split()
CODECS = "_codecs_cn _codecs_hk _codecs_iso2022 _codecs_jp _codecs_kr _codecs_tw unicodedata".split()

WITHOUT = """
import os, runpy, sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None  # import raises ImportError, as if the file were not installed
script = sys.argv[2]
sys.argv = sys.argv[2:]
if os.path.basename(script) == "mpudp.py":  # what `python3 mpudp.py` runs after its exec (run_as_import)
    sys.path.insert(0, os.path.dirname(script))
    import mpudp
    sys.exit(mpudp.main(sys.argv[1:]))
runpy.run_path(script, run_name="__main__")
"""


def run_without(tmp_path, modules, *argv):
    wrapper = write(tmp_path / "without.py", WITHOUT, 0o644)
    return subprocess.run([sys.executable, wrapper, ",".join(modules)] + list(argv), cwd=str(tmp_path),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=TIMEOUT_S)


def check_keygen_and_demo(tmp_path, missing):
    keygen = run_without(tmp_path, missing, KEYGEN)
    assert keygen.returncode == 0 and "Private Key" in keygen.stdout, keygen.stdout
    for config in (good_config(tmp_path), client_config(tmp_path)):
        check = run_without(tmp_path, missing, MPUDP, "-config=" + config, "--check")
        assert check.returncode == 0 and "config OK" in check.stdout, check.stdout
    demo = run_without(tmp_path, missing, MPUDP, "--demo", "--demo-seconds", "1")
    assert demo.returncode == 0 and "demo done" in demo.stdout, demo.stdout[-2000:]


def test_runs_with_python3_light_alone(tmp_path):
    """What packaging/README.md tells OpenWrt users to install (python3-light) is enough."""
    check_keygen_and_demo(tmp_path, NOT_IN_LIGHT + CODECS)
