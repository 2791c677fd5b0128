"""Config section of mpudp.py: parse_config on dicts, then the real command line."""

import base64
import copy
import json
import os
import re
import socket
import subprocess
import sys

import pytest

from conftest import MPUDP, ROOT, keypair, write_config
import mpudp

CLIENT_KEYS = keypair()
SERVER_KEYS = keypair()
OTHER_CLIENT_KEYS = keypair()

CLIENT = {
    "mode": "client",
    "client": {
        "listen_addr": "127.0.0.1:8999",
        "links": [{"remote_addr": "1.2.3.4:5000"}, {"remote_addr": "[240c::1]:5000"}],
        "client_private_key": CLIENT_KEYS[0],
        "server_public_key": SERVER_KEYS[1],
    },
}

SERVER = {
    "mode": "server",
    "server": {
        "listen_addr": ":5000",
        "upstream_addr": "127.0.0.1:6000",
        "server_private_key": SERVER_KEYS[0],
        "client_public_keys": [CLIENT_KEYS[1]],
    },
}

PRIVATE_KEYS = (CLIENT_KEYS[0], SERVER_KEYS[0], OTHER_CLIENT_KEYS[0])


def client(**changes):
    data = copy.deepcopy(CLIENT)
    data["client"].update(changes)
    return data


def server(**changes):
    data = copy.deepcopy(SERVER)
    data["server"].update(changes)
    return data


def without(data, section, key):
    data = copy.deepcopy(data)
    del data[section][key]
    return data


def errors_of(data):
    with pytest.raises(mpudp.ConfigError) as info:
        mpudp.parse_config(data)
    return str(info.value).splitlines()


def error_for(data, key_path):
    """The first error line for `key_path`; fails if there is none or an unrelated key is blamed.

    Follow-on errors inside the same key (a section that is not an object, so its
    keys are missing too) are allowed."""
    lines = errors_of(data)
    paths = [line.split(": ", 1)[0] for line in lines]
    assert key_path in paths, lines
    for path in paths:
        assert path == key_path or path.startswith(key_path + ".") or path.startswith(key_path + "["), lines
    return lines[paths.index(key_path)]


# -- good configs and defaults -----------------------------------------------------


def test_good_client_has_documented_defaults():
    config = mpudp.parse_config(copy.deepcopy(CLIENT))
    assert config.mode == "client"
    assert config.warnings == []
    c = config.section
    assert c.heartbeat_interval_s == 1
    assert c.loss_weight == 5
    assert c.rtt_weight == 1
    assert c.switch_threshold == 25
    assert c.throughput_threshold_kbps == 500
    assert c.max_consecutive_fail == 5
    assert c.dns_refresh_interval_s == 600
    assert c.client_id == 0
    assert c.session_timeout_s == 180
    assert c.max_sessions == 1024
    assert c.debug is False
    assert c.log_target == "stderr"
    assert c.score_file == ""
    assert (c.listen_host, c.listen_port) == ("127.0.0.1", 8999)
    assert [(l.remote_addr, l.host, l.port, l.priority) for l in c.links] == [
        ("1.2.3.4:5000", "1.2.3.4", 5000, 0), ("[240c::1]:5000", "240c::1", 5000, 0)]
    assert c.private_key == base64.b64decode(CLIENT_KEYS[0])
    assert c.server_public_key == base64.b64decode(SERVER_KEYS[1])


def test_good_server_has_documented_defaults():
    config = mpudp.parse_config(copy.deepcopy(SERVER))
    assert config.mode == "server"
    assert config.warnings == []
    s = config.section
    assert s.heartbeat_timeout_s == 10
    assert s.session_timeout_s == 180
    assert s.max_sessions == 1024
    assert s.dns_refresh_interval_s == 600
    assert (s.listen_host, s.listen_port) == ("", 5000)
    assert s.upstream_for(0) == ("127.0.0.1:6000", "127.0.0.1", 6000)
    assert s.client_public_keys == [base64.b64decode(CLIENT_KEYS[1])]


def test_client_and_server_configs_derive_the_same_secret():
    c = mpudp.parse_config(copy.deepcopy(CLIENT)).section
    s = mpudp.parse_config(copy.deepcopy(SERVER)).section
    assert c.static_secret == s.static_secrets[0]


def test_explicit_values_are_read():
    c = mpudp.parse_config(client(heartbeat_interval_sec=0.2, loss_weight=2, rtt_weight=0.5, switch_threshold=0,
                                  throughput_threshold_kbps=0, max_consecutive_fail=3, dns_refresh_interval_sec=0,
                                  client_id=7, session_timeout_sec=30, max_sessions=10, debug=True,
                                  score_file="/tmp/x.json",
                                  links=[{"remote_addr": "h.example:1", "priority": 5}])).section
    assert (c.heartbeat_interval_s, c.loss_weight, c.rtt_weight, c.switch_threshold) == (0.2, 2, 0.5, 0)
    assert (c.throughput_threshold_kbps, c.max_consecutive_fail, c.dns_refresh_interval_s) == (0, 3, 0)
    assert (c.client_id, c.session_timeout_s, c.max_sessions, c.debug) == (7, 30, 10, True)
    assert c.links[0].priority == 5 and c.links[0].host == "h.example"


def test_top_level_debug_turns_on_section_debug():
    data = copy.deepcopy(CLIENT)
    data["debug"] = True
    assert mpudp.parse_config(data).section.debug is True


def test_only_the_mode_section_is_read():
    data = copy.deepcopy(CLIENT)
    data["server"] = {"listen_addr": "garbage", "nonsense": 1}
    config = mpudp.parse_config(data)
    assert config.mode == "client"
    assert config.warnings == []


# -- errors name their key path -------------------------------------------------------


@pytest.mark.parametrize("bad", ["1.2.3.4", "::1:5000", "[::1]5000", "h:99999", "h:-1", ":5000", "h:0", 5000, None])
def test_bad_remote_addr(bad):
    data = client(links=[{"remote_addr": "1.2.3.4:5000"}, {"remote_addr": bad}])
    error_for(data, "client.links[1].remote_addr")


def test_missing_remote_addr():
    line = error_for(client(links=[{"priority": 1}]), "client.links[0].remote_addr")
    assert "required" in line


def test_links_shape_errors():
    assert error_for(client(links=[]), "client.links")
    assert error_for(client(links="1.2.3.4:5"), "client.links")
    assert error_for(client(links=["1.2.3.4:5"]), "client.links[0]")
    assert error_for(client(links=[{"remote_addr": "1.2.3.4:5", "priority": "high"}]), "client.links[0].priority")


@pytest.mark.parametrize("value,words", [
    ("1", "must be a number"),
    (True, "must be a number"),
    (None, "must be a number"),
    (-1, "at least"),
    (0, "at least"),
    (0.01, "at least"),
])
def test_bad_heartbeat_interval(value, words):
    line = error_for(client(heartbeat_interval_sec=value), "client.heartbeat_interval_sec")
    assert words in line


@pytest.mark.parametrize("key,value", [
    ("max_consecutive_fail", True),
    ("max_consecutive_fail", 2.5),
    ("max_consecutive_fail", 0),
    ("client_id", True),
    ("client_id", 65536),
    ("client_id", -1),
    ("max_sessions", False),
    ("debug", 1),
    ("debug", "yes"),
    ("log_target", "file"),
    ("loss_weight", -1),
    ("session_timeout_sec", 0),
    ("dns_refresh_interval_sec", 0.5),
])
def test_bad_client_values(key, value):
    error_for(client(**{key: value}), "client.%s" % key)


def test_bool_is_not_an_int_or_number():
    line = error_for(client(max_consecutive_fail=True), "client.max_consecutive_fail")
    assert "integer" in line and "true" in line
    error_for(client(loss_weight=False), "client.loss_weight")


@pytest.mark.parametrize("key", ["client_private_key", "server_public_key"])
@pytest.mark.parametrize("value,words", [
    ("definitely not base64!", "base64"),
    (base64.b64encode(b"\x01" * 31).decode(), "31 bytes"),
    (base64.b64encode(b"\x01" * 33).decode(), "33 bytes"),
    (1234, "string"),
])
def test_bad_client_keys(key, value, words):
    line = error_for(client(**{key: value}), "client.%s" % key)
    assert words in line
    if not isinstance(value, int):
        assert "keygen.py" in line  # tells how to make a good one


def test_low_order_server_public_key():
    line = error_for(client(server_public_key=base64.b64encode(bytes(32)).decode()), "client.server_public_key")
    assert "low-order" in line


def test_missing_keys_are_required():
    assert "required" in error_for(without(CLIENT, "client", "client_private_key"), "client.client_private_key")
    assert "required" in error_for(without(SERVER, "server", "server_private_key"), "server.server_private_key")


def test_mode_errors():
    assert error_for(dict(CLIENT, mode="relay"), "mode")
    assert "relay" in error_for(dict(CLIENT, mode="relay"), "mode")
    data = copy.deepcopy(CLIENT)
    del data["mode"]
    assert "required" in error_for(data, "mode")
    assert error_for(dict(CLIENT, mode=1), "mode")


def test_missing_or_wrong_section():
    assert "required" in error_for({"mode": "client"}, "client")
    assert error_for({"mode": "server", "server": []}, "server")


def test_missing_upstream_addr():
    line = error_for(without(SERVER, "server", "upstream_addr"), "server.upstream_addr")
    assert "required" in line


def test_bad_client_public_keys():
    error_for(server(client_public_keys=[CLIENT_KEYS[1], "AAAA"]), "server.client_public_keys[1]")
    error_for(server(client_public_keys=["bad!"]), "server.client_public_keys[0]")
    line = error_for(server(client_public_keys=[base64.b64encode(bytes(32)).decode()]), "server.client_public_keys[0]")
    assert "low-order" in line
    error_for(server(client_public_keys=[]), "server.client_public_keys")
    error_for(server(client_public_keys=CLIENT_KEYS[1]), "server.client_public_keys")
    error_for(without(SERVER, "server", "client_public_keys"), "server.client_public_keys")


def test_all_errors_are_reported_at_once():
    data = client(heartbeat_interval_sec=-1, client_id="0", links=[{"remote_addr": "x"}])
    del data["client"]["server_public_key"]
    paths = sorted(line.split(": ", 1)[0] for line in errors_of(data))
    assert paths == sorted(["client.heartbeat_interval_sec", "client.client_id", "client.links[0].remote_addr",
                            "client.server_public_key"])


def test_top_level_must_be_an_object():
    lines = errors_of([1, 2])
    assert any("must be a JSON object" in line for line in lines)


def test_top_level_error_has_a_key_path():
    # It once read ": must be a JSON object", naming nothing.
    for line in errors_of([1, 2]):
        assert not line.startswith(":"), line
        assert re.match(r"^\S[^:]*: \S", line), line


# -- server keys and upstreams -----------------------------------------------------------


def test_single_client_public_key_string_accepted():
    data = without(SERVER, "server", "client_public_keys")
    data["server"]["client_public_key"] = CLIENT_KEYS[1]
    config = mpudp.parse_config(data)
    assert config.section.client_public_keys == [base64.b64decode(CLIENT_KEYS[1])]
    assert config.warnings == []
    assert config.section.static_secrets == mpudp.parse_config(copy.deepcopy(SERVER)).section.static_secrets


def test_bad_single_client_public_key():
    data = without(SERVER, "server", "client_public_keys")
    data["server"]["client_public_key"] = "nope"
    error_for(data, "server.client_public_key")


def test_upstream_addrs_per_client():
    data = server(client_public_keys=[CLIENT_KEYS[1], OTHER_CLIENT_KEYS[1], keypair()[1]],
                  upstream_addrs=["127.0.0.1:7001", "[::1]:7002"])
    s = mpudp.parse_config(data).section
    assert s.upstream_for(0) == ("127.0.0.1:7001", "127.0.0.1", 7001)
    assert s.upstream_for(1) == ("[::1]:7002", "::1", 7002)
    assert s.upstream_for(2) == ("127.0.0.1:6000", "127.0.0.1", 6000)  # the default upstream_addr
    assert len(s.static_secrets) == 3
    assert len(set(s.static_secrets)) == 3


def test_upstream_addrs_covering_every_client_need_no_default():
    data = without(SERVER, "server", "upstream_addr")
    data["server"]["upstream_addrs"] = ["10.0.0.1:53"]
    s = mpudp.parse_config(data).section
    assert s.upstream_for(0) == ("10.0.0.1:53", "10.0.0.1", 53)


def test_upstream_addrs_short_of_clients_needs_a_default():
    data = without(SERVER, "server", "upstream_addr")
    data["server"]["client_public_keys"] = [CLIENT_KEYS[1], OTHER_CLIENT_KEYS[1]]
    data["server"]["upstream_addrs"] = ["10.0.0.1:53"]
    error_for(data, "server.upstream_addr")


def test_bad_upstream_addrs_entry_is_an_error():
    data = server(upstream_addrs=["10.0.0.1:53", "nope"])
    lines = errors_of(data)
    assert len(lines) == 1 and "upstream_addrs" in lines[0] and "nope" in lines[0]


def test_bad_upstream_addrs_entry_names_its_key_path():
    # Named like every other list element (it once read "server.upstream_addrs.1").
    error_for(server(upstream_addrs=["10.0.0.1:53", "nope"]), "server.upstream_addrs[1]")


def test_server_values():
    error_for(server(heartbeat_timeout_sec=0), "server.heartbeat_timeout_sec")
    error_for(server(heartbeat_timeout_sec=True), "server.heartbeat_timeout_sec")
    error_for(server(listen_addr="5000"), "server.listen_addr")
    error_for(server(max_sessions=0), "server.max_sessions")


@pytest.mark.parametrize("key", ["heartbeat_interval_sec", "session_timeout_sec", "switch_threshold"])
def test_non_finite_numbers_are_rejected(key):
    error_for(client(**{key: float("inf")}), "client.%s" % key)


def test_nan_is_rejected():
    error_for(client(heartbeat_interval_sec=float("nan")), "client.heartbeat_interval_sec")


# -- warnings -----------------------------------------------------------------------------


def test_unknown_key_warns_with_the_closest_key():
    data = client(heartbeat_intervall_sec=2)
    config = mpudp.parse_config(data)
    assert config.section.heartbeat_interval_s == 1  # the typo is not used
    (warning,) = config.warnings
    assert warning.startswith("client.heartbeat_intervall_sec: unknown key")
    assert "'heartbeat_interval_sec'" in warning


def test_unknown_keys_in_links_and_top_level():
    data = client(links=[{"remote_addr": "1.2.3.4:5", "priorty": 3}])
    data["debgu"] = True
    warnings = mpudp.parse_config(data).warnings
    assert any(w.startswith("client.links[0].priorty") and "'priority'" in w for w in warnings), warnings
    assert any(w.startswith("debgu") and "'debug'" in w for w in warnings), warnings


def test_unknown_key_without_a_close_match():
    warnings = mpudp.parse_config(client(zzzzzz=1)).warnings
    assert warnings == ["client.zzzzzz: unknown key"]


# -- secrets stay secret --------------------------------------------------------------------


def _assert_no_private_key(text):
    for key in PRIVATE_KEYS:
        assert key not in text
        assert key[:12] not in text  # not even a recognisable part of it


@pytest.mark.parametrize("data", [
    client(client_private_key=CLIENT_KEYS[0][:-2] + "!="),
    client(client_private_key=CLIENT_KEYS[0] + "AAAA"),
    client(client_private_key=CLIENT_KEYS[0], server_public_key=base64.b64encode(bytes(32)).decode()),
    client(client_private_key=CLIENT_KEYS[0], heartbeat_interval_sec="x", links=[]),
    server(server_private_key=SERVER_KEYS[0][1:]),
    server(client_public_keys=[OTHER_CLIENT_KEYS[0], "bad"]),
])
def test_config_errors_never_contain_private_key_text(data):
    text = "\n".join(errors_of(data))
    _assert_no_private_key(text)


@pytest.mark.parametrize("data", [
    client(client_private_key=[CLIENT_KEYS[0]]),
    server(server_private_key={"key": SERVER_KEYS[0]}),
])
def test_private_key_of_the_wrong_type_is_not_echoed(data):
    _assert_no_private_key("\n".join(errors_of(data)))


def test_config_objects_do_not_show_keys():
    for data in (CLIENT, SERVER):
        config = mpudp.parse_config(copy.deepcopy(data))
        _assert_no_private_key(repr(config.section))
        _assert_no_private_key("\n".join(mpudp.describe(config)))


# -- the command line ---------------------------------------------------------------------------


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, MPUDP] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, cwd=cwd or ROOT, timeout=60)


def test_cli_bad_config_exits_2_with_one_line_per_error(tmp_path):
    data = client(heartbeat_interval_sec=-1, links=[{"remote_addr": "1.2.3.4:5000"}, {"remote_addr": "nope"}])
    data["client"]["client_private_key"] = "short"
    path = write_config(tmp_path, data)
    result = cli("-config=%s" % path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 3
    paths = []
    for line in lines:
        match = re.match(r"^mpudp: config error: ([\w.\[\]]+): \S", line)
        assert match, line
        paths.append(match.group(1))
    assert sorted(paths) == sorted(["client.heartbeat_interval_sec", "client.links[1].remote_addr",
                                    "client.client_private_key"])
    assert result.stdout == ""


def test_cli_missing_file(tmp_path):
    path = str(tmp_path / "nowhere.json")
    result = cli("-config=%s" % path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mpudp: config error: %s: " % path)
    assert "Traceback" not in result.stderr


def test_cli_invalid_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"mode": "client",,}')
    os.chmod(str(path), 0o600)
    result = cli("-config=%s" % path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("mpudp: config error: %s: not valid JSON" % path)
    assert "Traceback" not in result.stderr


def test_cli_check_good_config(tmp_path):
    path = write_config(tmp_path, CLIENT)
    result = cli("-config=%s" % path, "--check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "config OK"
    assert result.stdout.splitlines()[0] == "mode: client"
    assert result.stderr == ""
    _assert_no_private_key(result.stdout + result.stderr)


def test_cli_check_good_server_config(tmp_path):
    path = write_config(tmp_path, SERVER)
    result = cli("--check", "-config=%s" % path)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    assert "client 0: upstream 127.0.0.1:6000" in result.stdout


@pytest.mark.parametrize("style", ["-config=X", "-config X", "--config=X", "--config X"])
def test_cli_config_option_spellings(tmp_path, style):
    path = write_config(tmp_path, CLIENT)
    args = [part.replace("X", path) for part in style.split(" ")]
    result = cli(*(args + ["--check"]))
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout


def test_cli_default_config_is_config_json_in_the_working_directory(tmp_path):
    write_config(tmp_path, SERVER)
    result = cli("--check", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "mode: server" in result.stdout


def test_cli_version():
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "mpudp %s" % mpudp.__version__
    assert re.match(r"^\d+\.\d+\.\d+", mpudp.__version__)


def _placeholder_paths(data):
    """Key paths of the mode section's values still waiting to be filled in."""
    mode = data["mode"]
    paths = set()
    for key, value in data[mode].items():
        if isinstance(value, str) and "PASTE" in value:
            paths.add("%s.%s" % (mode, key))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, str) and "PASTE" in item:
                    paths.add("%s.%s[%d]" % (mode, key, i))
    return paths


def test_cli_repo_template_config_fails_check_naming_the_fields_to_fill():
    path = os.path.join(ROOT, "config.json")
    if not os.path.exists(path):
        pytest.skip("no top-level config.json yet")
    with open(path) as f:
        data = json.load(f)
    expected = _placeholder_paths(data)
    if not expected:
        pytest.skip("config.json has no placeholders left (a real, filled-in config)")
    result = cli("-config=%s" % path, "--check")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    named = set()
    for line in result.stderr.splitlines():
        if line.startswith("mpudp: config error: "):
            named.add(line[len("mpudp: config error: "):].split(": ", 1)[0])
    assert named == expected


def test_cli_world_readable_config_warns(tmp_path):
    path = write_config(tmp_path, CLIENT)
    os.chmod(path, 0o644)
    result = cli("-config=%s" % path, "--check")
    assert result.returncode == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("mpudp: warning: ")]
    assert len(warnings) == 1
    assert "chmod 600" in warnings[0]
    assert path in warnings[0]


def test_cli_unknown_key_warning_on_stderr(tmp_path):
    path = write_config(tmp_path, client(heartbeat_intervall_sec=2))
    result = cli("-config=%s" % path, "--check")
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        "mpudp: warning: client.heartbeat_intervall_sec: unknown key; did you mean 'heartbeat_interval_sec'?"]


def test_redundancy_default_count_and_auto():
    assert mpudp.parse_config(copy.deepcopy(CLIENT)).section.redundancy == 1
    assert mpudp.parse_config(client(redundancy=2)).section.redundancy == 2
    assert mpudp.parse_config(client(redundancy="auto")).section.redundancy == "auto"


@pytest.mark.parametrize("value", [0, 9, -1, "two", 1.5, True, None])
def test_bad_redundancy(value):
    line = error_for(client(redundancy=value), "client.redundancy")
    assert "from 1 to 8" in line or "must be" in line


def test_link_socket_options_are_read():
    links = [{"remote_addr": "1.2.3.4:5000", "bind_interface": "wwan0", "fwmark": "0x64"},
             {"remote_addr": "[240c::1]:5000", "bind_addr": "2001:db8::7", "fwmark": 7},
             {"remote_addr": "1.2.3.4:5000", "bind_addr": "192.0.2.7:40000"}]
    c = mpudp.parse_config(client(links=links)).section
    assert [(l.bind_interface, l.fwmark) for l in c.links] == [("wwan0", 0x64), ("", 7), ("", 0)]
    assert c.links[1].bind_addr[1:] == (socket.AF_INET6, ("2001:db8::7", 0, 0, 0))
    assert c.links[2].bind_addr[1:] == (socket.AF_INET, ("192.0.2.7", 40000))
    assert [mpudp.describe_link_binding(l) for l in c.links] == [
        "dev wwan0 mark 0x64", "mark 0x7 from 2001:db8::7", "from 192.0.2.7:40000"]
