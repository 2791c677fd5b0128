"""packaging/openwrt/mpudp.init under a fake rc.common and procd.

The harness does what OpenWrt's /etc/rc.common does with a procd script (its
restart is defined before the script is sourced, its start/stop/reload after)
and records every procd call, logger line and chown to $RECORD.  The init
script's converter (uci2json.py) and its `mpudp.py --check` run for real, on a
copy of the installed files in a temp dir.  A test that "keeps the relay"
asserts that the instance list procd is sent is the same as before the bad
edit (so procd changes nothing), or that nothing is sent at all.
"""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

import mpudp

pytestmark = pytest.mark.slow  # the init script under stub procd: the same on every Python (tox.ini)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INIT = os.path.join(ROOT, "packaging", "openwrt", "mpudp.init")
TIMEOUT_S = 60

HARNESS = r"""
record() {
	printf '%s' "$1" >> "$RECORD"
	shift
	for arg in "$@"; do printf '\t%s' "$arg" >> "$RECORD"; done
	printf '\n' >> "$RECORD"
}
# /lib/functions/procd.sh, as far as the script uses it
procd_open_service() { record procd_open_service "$@"; }
procd_close_service() { service_triggers; record procd_close_service "$@"; }
procd_open_instance() { record procd_open_instance "$@"; }
procd_set_param() { record procd_set_param "$@"; }
procd_append_param() { record procd_append_param "$@"; }
procd_close_instance() { record procd_close_instance "$@"; }
procd_add_jail() { record procd_add_jail "$@"; }
procd_send_signal() { record procd_send_signal "$@"; }
procd_kill() { record procd_kill "$@"; }
procd_add_reload_trigger() { record procd_add_reload_trigger "$@"; }
procd_lock() { :; }
logger() { record logger "$@"; }
chown() { record chown "$@"; }	# the test user need not exist here
# /etc/rc.common: restart before the script, the procd verbs after it
restart() { trap '' TERM; stop "$@"; trap - TERM; start "$@"; }
initscript=/etc/init.d/mpudp
. "$INIT"
rc_procd() { local ret; procd_open_service mpudp "$initscript"; "$@"; ret=$?; procd_close_service; return $ret; }
start() {
	local ret
	rc_procd start_service "$@"; ret=$?
	if type service_started >/dev/null 2>&1; then service_started; fi
	return $ret
}
stop() { procd_lock; stop_service "$@"; procd_kill mpudp "$1"; }
reload() { if type reload_service >/dev/null 2>&1; then procd_lock; reload_service "$@"; else start; fi; }
status() { status_service "$@"; }
"$@"
"""


def keys():
    private = mpudp.generate_private_key()
    return mpudp.encode_key(private), mpudp.encode_key(mpudp.public_key(private))


class Router:
    """A temp dir laid out as a router: the installed files, /etc/config/mpudp, /var/etc, /var/run."""

    def __init__(self, tmp_path, shell=("sh",)):
        self.dir = tmp_path
        self.shell = list(shell)
        self.share = tmp_path / "usr" / "share" / "mpudp"
        self.share.mkdir(parents=True)
        shutil.copy(os.path.join(ROOT, "mpudp.py"), str(self.share))
        shutil.copy(os.path.join(ROOT, "packaging", "openwrt", "uci2json.py"), str(self.share))
        self.uci = tmp_path / "etc" / "config" / "mpudp"
        self.uci.parent.mkdir(parents=True)
        self.etc = tmp_path / "var" / "etc" / "mpudp"
        self.run_dir = tmp_path / "var" / "run" / "mpudp"
        self.ujail = tmp_path / "sbin" / "ujail"
        self.ujail.parent.mkdir()
        self.ujail.write_text("#!/bin/sh\n")
        os.chmod(str(self.ujail), 0o755)
        self.harness = tmp_path / "harness.sh"
        self.harness.write_text(HARNESS)
        self.record = tmp_path / "record"
        self.client_private, self.client_public = keys()
        self.server_private, self.server_public = keys()

    def client(self, name="client", extra=""):
        return ("config mpudp '%s'\n\toption mode 'client'\n\toption listen_addr '127.0.0.1:8999'\n"
                "\tlist link '127.0.0.1:5000'\n\toption client_private_key '%s'\n"
                "\toption server_public_key '%s'\n%s\n" % (name, self.client_private, self.server_public, extra))

    def server(self, name="server", extra=""):
        return ("config mpudp '%s'\n\toption mode 'server'\n\toption listen_addr '127.0.0.1:5000'\n"
                "\toption upstream_addr '127.0.0.1:6000'\n\toption server_private_key '%s'\n"
                "\tlist client_public_key '%s'\n%s\n" % (name, self.server_private, self.client_public, extra))

    def run(self, *command, **env):
        """rc.common ACTION: (exit status, output, recorded calls)."""
        if self.record.exists():
            self.record.unlink()
        full = {k: v for k, v in os.environ.items() if not k.startswith("MPUDP_")}
        full.update(RECORD=str(self.record), INIT=INIT, MPUDP_PYTHON=sys.executable,
                    MPUDP_PROG=str(self.share / "mpudp.py"), MPUDP_UCI=str(self.uci), MPUDP_ETC=str(self.etc),
                    MPUDP_RUN=str(self.run_dir), MPUDP_UJAIL=str(self.ujail))
        full.update(env)
        proc = subprocess.run(self.shell + [str(self.harness)] + list(command), cwd=str(self.dir),
                              env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=TIMEOUT_S)
        calls = []
        if self.record.exists():
            calls = [line.rstrip("\n").split("\t") for line in self.record.read_text().splitlines()]
        return proc.returncode, proc.stdout, calls

    def json(self, name):
        return json.loads((self.etc / (name + ".json")).read_text())


def instances(calls):
    """{name: [calls inside its procd_open_instance .. procd_close_instance]}."""
    found, current = {}, None
    for call in calls:
        if call[0] == "procd_open_instance":
            current = found.setdefault(call[1], [])
        elif call[0] == "procd_close_instance":
            current = None
        elif current is not None:
            current.append(call)
    return found


def params(instance_calls):
    return {call[1]: call[2:] for call in instance_calls if call[0] == "procd_set_param"}


def names(calls, verb):
    return [call for call in calls if call[0] == verb]


def logged(calls):
    return "\n".join(call[-1] for call in calls if call[0] == "logger")


def shells():
    found = [pytest.param(("sh",), id="sh")]
    for argv, name in ((("dash",), "dash"), (("busybox", "sh"), "busybox")):
        found.append(pytest.param(argv, id=name, marks=pytest.mark.skipif(
            not shutil.which(argv[0]), reason="%s is not installed" % name)))
    return found


@pytest.fixture
def router(tmp_path):
    return Router(tmp_path)


@pytest.fixture(params=shells())
def any_shell_router(request, tmp_path):
    """The router, under sh, dash and busybox ash (OpenWrt's) where installed."""
    return Router(tmp_path, request.param)


# -- start -----------------------------------------------------------------------


def test_start_opens_one_instance_per_enabled_section(any_shell_router):
    router = any_shell_router
    router.uci.write_text(router.client() + router.server() + router.client("off", "\toption enabled '0'"))
    code, out, calls = router.run("start")
    assert code == 0, out
    found = instances(calls)
    assert sorted(found) == ["client", "server"]
    for name in ("client", "server"):
        p = params(found[name])
        json_path = str(router.etc / (name + ".json"))
        assert p["command"] == [sys.executable, str(router.share / "mpudp.py"), "-config=%s" % json_path]
        assert p["respawn"] == ["3600", "10", "0"] and p["stdout"] == ["1"] and p["stderr"] == ["1"]
        assert p["limits"] == ["nofile=65536 65536"]
        assert p["user"] == ["mpudp"]  # not root
        assert "capabilities" not in p and not names(found[name], "procd_add_jail")  # none needed
        assert stat.S_IMODE(os.stat(json_path).st_mode) == 0o600
        assert ["chown", "mpudp", json_path + ".new"] in calls  # owned by its user before it is put in place
        assert (router.run_dir / name).is_dir()
    assert router.json("client")["client"]["server_public_key"] == router.server_public
    assert router.json("server")["server"]["status_file"] == str(router.run_dir / "server" / "status.json")
    assert not (router.etc / "off.json").exists()
    assert ["procd_add_reload_trigger", "mpudp"] in calls
    assert "logger" not in [call[0] for call in calls], logged(calls)
    assert not names(calls, "procd_send_signal")  # nothing ran before


def test_start_compiles_the_bytecode_once(router):
    router.uci.write_text(router.client())
    cache = router.share / "__pycache__"
    assert not cache.exists()
    router.run("start")
    (pyc,) = os.listdir(str(cache))
    first = os.stat(str(cache / pyc)).st_mtime_ns
    router.run("start")
    assert os.stat(str(cache / pyc)).st_mtime_ns == first  # fresh: not written again


def test_capabilities_through_ujail_only_for_what_the_links_need(any_shell_router):
    router = any_shell_router
    router.uci.write_text(router.client(extra="\tlist link '127.0.0.1:5001 mark 0x64'"))
    code, out, calls = router.run("start")
    assert code == 0, out
    p = params(instances(calls)["client"])
    assert p["user"] == ["mpudp"] and p["no_new_privs"] == ["1"]
    with open(p["capabilities"][0]) as f:
        caps = json.load(f)
    assert caps == {key: ["CAP_NET_ADMIN"] for key in ("bounding", "effective", "permitted", "inheritable", "ambient")}
    assert names(instances(calls)["client"], "procd_add_jail") == [["procd_add_jail", "mpudp"]]


def test_root_only_when_asked(router):
    router.uci.write_text(router.client(extra="\toption user 'root'\n\tlist link '127.0.0.1:5001 mark 7'"))
    code, out, calls = router.run("start")
    p = params(instances(calls)["client"])
    assert code == 0 and "user" not in p and "capabilities" not in p, out


def test_capabilities_without_ujail_are_refused_by_name(router):
    router.uci.write_text(router.client(extra="\tlist link '127.0.0.1:5001 mark 7'"))
    code, out, calls = router.run("start", MPUDP_UJAIL=str(router.dir / "no-ujail"))
    assert "client" not in instances(calls)
    assert "opkg install procd-ujail" in logged(calls) and "CAP_NET_ADMIN" in logged(calls)


def test_a_bad_section_is_refused_and_named_the_others_start(router):
    router.uci.write_text(router.client(extra="\toption heartbeat_interval_sec 'fast'") + router.server())
    code, out, calls = router.run("start")
    assert sorted(instances(calls)) == ["server"]
    log = logged(calls)
    assert "start refused for client" in log and "mpudp.client.heartbeat_interval_sec: 'fast' is not a number" in log
    assert "mpudp.client.heartbeat_interval_sec" in out  # and on the terminal
    assert not (router.etc / "client.json").exists() and not (router.etc / "client.json.new").exists()


def test_mpudp_check_refusal_is_logged_line_by_line(router):
    router.uci.write_text(router.client().replace(router.server_public, "not-a-key"))
    code, out, calls = router.run("start")
    assert "client" not in instances(calls)
    lines = [call[-1] for call in calls if call[0] == "logger"]
    assert any("mpudp.py --check failed" in line for line in lines), lines
    assert sum("client.server_public_key" in line for line in lines) == 1, lines


def test_an_unreadable_uci_file_changes_nothing(router):
    router.uci.write_text(router.client())
    router.run("start")
    router.uci.write_text("config mpudp 'client\n")
    code, out, calls = router.run("start")
    assert code != 0
    assert not names(calls, "procd_close_service")  # exit before the instance list is sent
    assert "nothing started or changed" in logged(calls)


def test_missing_python_is_named(router):
    router.uci.write_text(router.client())
    code, out, calls = router.run("start", MPUDP_PYTHON=str(router.dir / "no-python3"))
    assert code != 0 and not names(calls, "procd_close_service")
    assert "opkg install python3-light" in logged(calls)


# -- reload: apply an edit, keep the relay on a bad one ----------------------------


def test_reload_with_a_bad_edit_keeps_the_running_relay(any_shell_router):
    router = any_shell_router
    router.uci.write_text(router.client() + router.server())
    _, _, first = router.run("start")
    before = router.json("client")
    router.uci.write_text(router.client(extra="\tlist link '127.0.0.1:5000 prio 3'") + router.server())
    code, out, calls = router.run("reload")
    assert instances(calls) == instances(first)  # procd is sent the same instances: it changes nothing
    assert router.json("client") == before
    assert not names(calls, "procd_send_signal") and not names(calls, "procd_kill")
    log = logged(calls)
    assert "unknown word 'prio'" in log and "client keeps running on its last good config" in log


def test_reload_with_a_good_edit_signals_only_the_changed_daemon(any_shell_router):
    router = any_shell_router
    router.uci.write_text(router.client() + router.server())
    _, _, first = router.run("start")
    router.uci.write_text(router.client(extra="\toption heartbeat_interval_sec '0.5'") + router.server())
    code, out, calls = router.run("reload")
    assert code == 0, out
    assert router.json("client")["client"]["heartbeat_interval_sec"] == 0.5
    assert instances(calls) == instances(first)  # same command, user: procd does not restart it
    assert names(calls, "procd_send_signal") == [["procd_send_signal", "mpudp", "client", "HUP"]]
    # Signalled after procd has the instance list.
    order = [call[0] for call in calls]
    assert order.index("procd_send_signal") > order.index("procd_close_service")


def test_reload_that_needs_new_capabilities_restarts_instead_of_signalling(router):
    router.uci.write_text(router.client())
    _, _, first = router.run("start")
    router.uci.write_text(router.client(extra="\tlist link '127.0.0.1:5001 mark 7'"))
    code, out, calls = router.run("reload")
    assert code == 0, out
    assert not names(calls, "procd_send_signal")
    assert "capabilities" in params(instances(calls)["client"])  # a changed instance: procd restarts it


def test_reload_drops_a_disabled_section(router):
    router.uci.write_text(router.client() + router.server())
    router.run("start")
    router.uci.write_text(router.client() + router.server(extra="\toption enabled '0'"))
    code, out, calls = router.run("reload")
    assert sorted(instances(calls)) == ["client"]  # procd stops the server
    assert not (router.etc / "server.json").exists()


# -- restart: checked first --------------------------------------------------------


def test_restart_with_a_bad_config_stops_nothing(any_shell_router):
    router = any_shell_router
    router.uci.write_text(router.client() + router.server())
    router.run("start")
    before = router.json("server")
    router.uci.write_text(router.client() + router.server(extra="\toption debug 'maybe'"))
    code, out, calls = router.run("restart")
    assert code != 0
    assert not names(calls, "procd_kill") and not names(calls, "procd_open_service")
    assert router.json("server") == before
    assert "restart refused" in logged(calls) and "mpudp.server.debug" in logged(calls)


def test_restart_with_a_good_config_stops_then_starts(router):
    router.uci.write_text(router.client())
    router.run("start")
    router.uci.write_text(router.client(extra="\toption debug '1'"))
    code, out, calls = router.run("restart")
    assert code == 0, out
    order = [call[0] for call in calls]
    assert order.index("procd_kill") < order.index("procd_open_instance")
    assert router.json("client")["client"]["debug"] is True
    assert not names(calls, "procd_send_signal")  # a fresh start: nothing to tell


# -- check, status ------------------------------------------------------------------


def test_check_says_what_each_section_means(router):
    router.uci.write_text(router.client() + router.server(extra="\toption max_sessions 'many'"))
    code, out, _ = router.run("check")
    assert code != 0
    assert "== client" in out and "config OK" in out
    assert "mpudp.server.max_sessions: 'many' is not a whole number" in out
    assert not (router.etc / "client.json").exists()  # check starts nothing


def test_status_shows_each_running_instance(router):
    router.uci.write_text(router.client())
    router.run("start")
    code, out, _ = router.run("status")
    assert "== client" in out and "mpudp is not running" in out  # no daemon here wrote its status file


def test_stop_forgets_the_generated_files(router):
    router.uci.write_text(router.client())
    router.run("start")
    code, out, calls = router.run("stop")
    assert ["procd_kill", "mpudp", ""] in calls
    assert not (router.etc / "client.json").exists()
