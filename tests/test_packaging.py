"""Deployment files: the OpenWrt procd init script, the systemd unit and install.sh.

The init script runs in a fake procd: a harness defines procd_open_instance,
procd_set_param, procd_close_instance, procd_send_signal and logger as shell
functions that record their arguments, sources the script and calls one of
its functions.  Its config check runs the repo's mpudp.py for real.
"""

import json
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
LICENSE = os.path.join(ROOT, "LICENSE")
UCI2JSON = os.path.join(PACKAGING, "openwrt", "uci2json.py")
UCI_TEMPLATE = os.path.join(PACKAGING, "openwrt", "mpudp.config")
MAKEFILE = os.path.join(PACKAGING, "openwrt", "Makefile")
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


# -- shell scripts (the init script's behaviour: tests/test_openwrt_init.py) -----


@pytest.mark.parametrize("argv", [["sh", "-n"], ["dash", "-n"], ["busybox", "sh", "-n"]],
                         ids=["sh", "dash", "busybox"])
@pytest.mark.parametrize("script", [INIT, INSTALL], ids=["init", "install.sh"])
def test_shell_syntax(argv, script):
    if not shutil.which(argv[0]):
        pytest.skip("%s is not installed" % argv[0])
    proc = subprocess.run(argv + [script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout


def test_init_script_header_and_defaults():
    with open(INIT) as f:
        text = f.read()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    for line in ("START=95", "STOP=10", "USE_PROCD=1", 'PYTHON="${MPUDP_PYTHON:-/usr/bin/python3}"',
                 'PROG="${MPUDP_PROG:-/usr/share/mpudp/mpudp.py}"', 'UCI2JSON="${PROG%/*}/uci2json.py"',
                 'UCI_FILE="${MPUDP_UCI:-/etc/config/mpudp}"', 'ETC_DIR="${MPUDP_ETC:-/var/etc/mpudp}"',
                 'UJAIL="${MPUDP_UJAIL:-/sbin/ujail}"'):
        assert re.search(r"^%s" % re.escape(line), text, re.M), line


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
    # Checked first: systemd runs ExecReload= lines in order and stops at the first that fails.
    assert [line.split() for line in d[("Service", "ExecReload")]] == [start + ["--check"], ["/bin/kill", "-HUP", "$MAINPID"]]
    assert one("Restart") == "on-failure"
    assert ("Service", "RestartPreventExitStatus") not in d  # a bad config is retried too
    assert 5 <= float(one("RestartSec").rstrip("s")) <= 30
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
    # A bind failure at boot (the address is not there yet) must not leave the unit failed for good.
    assert one("StartLimitIntervalSec", "Unit") == "0"
    assert one("WantedBy", "Install") == "multi-user.target"


def test_unit_and_init_script_run_the_same_files():
    start = unit_directives()[("Service", "ExecStart")][0].split()
    with open(INIT) as f:
        init = f.read()
    assert 'PYTHON="${MPUDP_PYTHON:-%s}"' % start[0] in init
    assert 'PROG="${MPUDP_PROG:-%s}"' % start[1] in init


def run_exec_reload(config, main_pid):
    """Run the unit's ExecReload= lines as systemd does: in order, stopping at the first that fails."""
    for line in unit_directives()[("Service", "ExecReload")]:
        argv = [arg.replace("%i", "x").replace("$MAINPID", str(main_pid)) for arg in line.split()]
        argv = [sys.executable if a == "/usr/bin/python3" else MPUDP if a == "/usr/share/mpudp/mpudp.py"
                else "-config=%s" % config if a.startswith("-config=") else a for a in argv]
        if subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=TIMEOUT_S).returncode:
            return False
    return True


HUP_WAITER = """
import signal, sys
got = []
signal.signal(signal.SIGHUP, lambda *a: got.append(1))
print("ready", flush=True)
sys.stdin.readline()  # the test says when to report
print("hup" if got else "no hup", flush=True)
"""


@pytest.mark.parametrize("good", [True, False], ids=["good", "bad"])
def test_exec_reload_signals_only_after_the_check_passes(tmp_path, good):
    config = good_config(tmp_path) if good else write(tmp_path / "config.json", '{"mode": "server"}')
    daemon = subprocess.Popen([sys.executable, "-c", HUP_WAITER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              universal_newlines=True)
    try:
        assert daemon.stdout.readline().strip() == "ready"
        assert run_exec_reload(config, daemon.pid) is good  # a bad file fails `systemctl reload`
        daemon.stdin.write("report\n")
        daemon.stdin.flush()
        assert daemon.stdout.readline().strip() == ("hup" if good else "no hup")
    finally:
        daemon.kill()
        daemon.wait(TIMEOUT_S)


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
    assert read(share / "uci2json.py") == read(UCI2JSON) and read(share / "LICENSE") == read(LICENSE)
    assert read(root / "etc" / "config" / "mpudp") == read(UCI_TEMPLATE)
    assert mode(root / "etc" / "config" / "mpudp") == 0o600  # it may hold keys
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
    (root / "etc" / "config").mkdir()
    uci = write(root / "etc" / "config" / "mpudp", "config mpudp 'mine'\n", 0o644)
    install(root, "openwrt")
    assert read(uci) == "config mpudp 'mine'\n"
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


# -- the OpenWrt package (packaging/openwrt/Makefile) ------------------------------
#
# The SDK is not reachable here. GNU make runs the real Makefile against a stub
# rules.mk and package.mk (INSTALL_* as OpenWrt defines them); BuildPackage
# runs Build/Prepare and Package/mpudp/install into a staging dir.

STUB_RULES = """
INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600
CP:=cp -fpR
INCLUDE_DIR:=$(TOPDIR)/include
"""
STUB_PACKAGE = """
PKG_BUILD_DIR:=$(BUILD_DIR)/$(PKG_NAME)-$(PKG_VERSION)
define BuildPackage
$$(eval $$(Package/$(1)))
stage:
\t$$(call Build/Prepare)
\t$$(call Build/Compile)
\t$$(call Package/$(1)/install,$$(DEST))
vars:
\t@echo 'PKG_NAME=$$(PKG_NAME)'
\t@echo 'PKG_VERSION=$$(PKG_VERSION)'
\t@echo 'PKG_RELEASE=$$(PKG_RELEASE)'
\t@echo 'PKG_LICENSE=$$(PKG_LICENSE)'
\t@echo 'PKG_LICENSE_FILES=$$(PKG_LICENSE_FILES)'
\t@echo 'DEPENDS=$$(DEPENDS)'
\t@echo 'PKGARCH=$$(PKGARCH)'
\t@echo 'USERID=$$(USERID)'
\t@echo 'CONFFILES=$$(strip $$(Package/$(1)/conffiles))'
endef
"""


@pytest.fixture
def package(tmp_path):
    """(the staged package root, its variables) from `make stage vars` on the real Makefile."""
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    top = tmp_path / "sdk"
    (top / "include").mkdir(parents=True)
    write(top / "rules.mk", STUB_RULES, 0o644)
    write(top / "include" / "package.mk", STUB_PACKAGE, 0o644)
    dest = tmp_path / "ipkg"
    proc = subprocess.run(["make", "-s", "-C", os.path.dirname(MAKEFILE), "TOPDIR=%s" % top,
                           "BUILD_DIR=%s" % (tmp_path / "build"), "DEST=%s" % dest, "stage", "vars"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout
    variables = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return dest, variables


def tree(root):
    """{relative path: mode} of every file under root, __pycache__ left out."""
    found = {}
    for directory, dirs, files in os.walk(str(root)):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, str(root))] = mode(path)
    return found


def test_package_installs_what_install_sh_installs(tmp_path, package):
    dest, _ = package
    install(tmp_path / "root", "openwrt")
    by_hand = tree(tmp_path / "root")
    # install.sh also makes /etc/mpudp/config.json from the example (the package
    # leaves that to the operator: UCI is its config, the example stays an example).
    del by_hand[os.path.join("etc", "mpudp", "config.json")]
    assert tree(dest) == by_hand
    for name in ("mpudp.py", "keygen.py", "uci2json.py", "LICENSE"):
        assert read(dest / "usr" / "share" / "mpudp" / name) == read(os.path.join(ROOT, name) if name != "uci2json.py"
                                                                       else UCI2JSON)
    assert read(dest / "etc" / "init.d" / "mpudp") == read(INIT)


def test_package_variables(package):
    dest, v = package
    assert v["PKG_NAME"] == "mpudp"
    assert v["PKG_VERSION"] == mpudp.__version__
    assert v["PKG_RELEASE"].isdigit()
    assert v["PKG_LICENSE"] == "MIT" and "MIT License" in read(os.path.join(ROOT, v["PKG_LICENSE_FILES"]))
    assert v["DEPENDS"] == "+python3-light"
    assert v["PKGARCH"] == "all"
    assert v["USERID"] == "mpudp:mpudp"  # the user the init script runs the relays as
    conffiles = v["CONFFILES"].split()
    assert conffiles == ["/etc/config/mpudp", "/etc/mpudp/"]
    for path in conffiles:  # each one is installed, so sysupgrade and opkg keep the operator's edits
        assert (dest / path.lstrip("/")).exists(), path


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
    uci = write(tmp_path / "uci", "config mpudp 'x'\n option config '%s'\n" % good_config(tmp_path), 0o600)
    converted = run_without(tmp_path, missing, UCI2JSON, "--uci", uci, "--bytecode", MPUDP, "convert", "x",
                            str(tmp_path / "x.json"))
    assert converted.returncode == 0 and converted.stdout.strip() == "mpudp", converted.stdout
    demo = run_without(tmp_path, missing, MPUDP, "--demo", "--demo-seconds", "1")
    assert demo.returncode == 0 and "demo done" in demo.stdout, demo.stdout[-2000:]


def test_runs_with_python3_light_alone(tmp_path):
    """What packaging/README.md tells OpenWrt users to install (python3-light) is enough,
    for the daemon, keygen.py and the init script's uci2json.py."""
    check_keygen_and_demo(tmp_path, NOT_IN_LIGHT + CODECS)


# -- what a newcomer reads and copies ------------------------------------------


def test_top_level_config_is_safe_and_says_keys_must_be_generated():
    with open(os.path.join(ROOT, "config.json")) as f:
        config = json.load(f)
    assert config["client"]["listen_addr"].startswith("127.0.0.1:")  # never open to the WAN by default
    result = subprocess.run([sys.executable, MPUDP, "-config=%s" % os.path.join(ROOT, "config.json"), "--check"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                            timeout=TIMEOUT_S)
    errors = [line for line in result.stdout.splitlines() if "config error" in line]
    assert result.returncode == 2 and errors, result.stdout
    assert all("keygen.py" in line for line in errors), errors


@pytest.mark.parametrize("doc", ["README.md", os.path.join("packaging", "README.md")])
def test_doc_links_stay_inside_the_repository(doc):
    """A clone or a router has no ../shared: every relative link names a file of the repo."""
    path = os.path.join(ROOT, doc)
    with open(path) as f:
        text = f.read()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
        assert resolved.startswith(ROOT + os.sep) and os.path.exists(resolved), target
