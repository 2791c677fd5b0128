"""Private keys never appear in logs, in the score_file or status_file, in `--check` or
`--status` output, or in config errors, whatever path a mistake takes (a mistyped key, a
refused reload, debug output, SIGUSR1 tables).
"""

import json
import os
import signal
import subprocess
import sys

import mpudp
from conftest import keypair, write_config
from helpers import App, wait_until


def secret_forms(private_b64s, extra=()):
    """The ways a key could leak: base64, a 16-character piece of it, hex."""
    forms = []
    for private_b64 in private_b64s:
        raw = mpudp.decode_key(private_b64)
        forms += [private_b64, private_b64[:16], private_b64[16:32], raw.hex()[:32]]
    for raw in extra:
        forms += [mpudp.encode_key(raw)[:16], raw.hex()[:32]]
    return forms


def run_cli(*args):
    return subprocess.run([sys.executable, mpudp.__file__] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True).stdout


def test_private_keys_never_in_logs_or_status_files(tapped_pair, tmp_path):
    score_file = os.path.join(str(tmp_path), "score.json")
    status_file = os.path.join(str(tmp_path), "status.json")
    pair = tapped_pair(config_mode=0o644,  # also the "readable by other users" warning
                       server={"debug": True, "max_sesions": 10, "status_file": status_file,
                               "heartbeat_timeout_sec": 1},
                       client={"debug": True, "score_file": score_file, "hearbeat_interval": 1})
    app = App(pair.client_address)
    for i in range(5):
        app.probe("traffic")
    wait_until(lambda: os.path.exists(score_file) and os.path.exists(status_file), what="the status files")
    for process in (pair.client, pair.server):  # SIGUSR1: the status table in the log
        mark = len(process.lines)
        process.proc.send_signal(signal.SIGUSR1)
        process.wait_for_line("epoch", start=mark)
    # SIGHUP with another private key in the file: refused, and the new key is not logged either.
    other_private, _other_public = keypair()
    with open(pair.client_config) as f:
        original = f.read()
    config = json.loads(original)
    config["client"]["client_private_key"] = other_private
    with open(pair.client_config, "w") as f:
        json.dump(config, f)
    mark = len(pair.client.lines)
    pair.client.proc.send_signal(signal.SIGHUP)
    pair.client.wait_for_line("reload refused", start=mark)
    with open(pair.client_config, "w") as f:
        f.write(original)
    pair.client.proc.send_signal(signal.SIGHUP)
    pair.client.wait_for_line("config reloaded", start=mark)
    app.probe("after-reload")
    cli = [run_cli("-config=%s" % path, flag) for path in (pair.server_config, pair.client_config)
           for flag in ("--check", "--status")]
    assert pair.client.stop() == 0 and pair.server.stop() == 0
    texts = [("client log", pair.client.output()), ("server log", pair.server.output())]
    for path in (score_file, status_file):
        with open(path) as f:
            texts.append((os.path.basename(path), f.read()))
    texts += [("command line", text) for text in cli]
    everything = "\n".join(text for _name, text in texts)
    for exercised in ("did you mean", "readable by other users", "opened for", "srtt ms", "reload refused"):
        assert exercised in everything, exercised  # the paths that could leak were taken
    for name, text in texts:
        for secret in secret_forms([pair.server_keys[0], pair.client_keys[0], other_private],
                                   [pair.client_secret]):
            assert secret not in text, "a private key (or the static secret) appears in the %s" % name
    app.close()


# ============================================================================
# Regressions: bugs these tests found, fixed in mpudp.py since
# ============================================================================


def test_a_mistyped_private_key_is_not_echoed_in_config_errors(tmp_path):
    """A private key given with the wrong JSON type (e.g. in a list) was echoed in the config
    error, 38 of its 44 base64 characters; on SIGHUP the same line goes to the log (syslog)."""
    private, public = keypair()
    leaks = []
    for wrong in ([private], {"key": private}):
        path = write_config(tmp_path, {"mode": "client", "client": {
            "listen_addr": "127.0.0.1:9", "links": [{"remote_addr": "127.0.0.1:5"}],
            "client_private_key": wrong, "server_public_key": public}}, "mistyped.json")
        out = run_cli("-config=%s" % path, "--check")
        assert "client_private_key" in out  # the error is reported...
        leaks += [form for form in secret_forms([private]) if form in out]
    assert leaks == [], "...with the key in it"
