"""The logger: levels, rate limiting with an injected clock, and the syslog target."""

import io
import sys

from conftest import FakeClock  # conftest also puts the repo on sys.path
import mpudp


class FakeSyslog:
    """Stands in for the `syslog` module: records what would reach the system log."""

    LOG_PID, LOG_DAEMON = 1, 24
    LOG_DEBUG, LOG_INFO, LOG_WARNING, LOG_ERR = 7, 6, 4, 3

    def __init__(self):
        self.opened = None
        self.lines = []

    def openlog(self, ident, option, facility):
        self.opened = (ident, option, facility)

    def syslog(self, priority, message):
        self.lines.append((priority, message))


def test_levels_and_line_format():
    stream = io.StringIO()
    log = mpudp.Log(stream=stream)
    log.debug("hidden")
    log.info("shown")
    log.set_debug(True)
    log.debug("now shown")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("INFO  shown") and lines[1].endswith("DEBUG now shown")
    assert lines[0][:4].isdigit() and lines[0][4] == "-"  # a timestamp first


def test_every_rate_limits_per_key_on_the_injected_clock():
    stream, clock = io.StringIO(), FakeClock()
    log = mpudp.Log(stream=stream, clock=clock)
    for _ in range(5):
        log.every("a", 10.0, "warn", "a happened")
    log.every("b", 10.0, "warn", "b happened")
    clock.advance(9.9)
    log.every("a", 10.0, "warn", "a happened")
    clock.advance(0.2)
    log.every("a", 10.0, "warn", "a again")
    lines = stream.getvalue().splitlines()
    assert [line.split("WARN  ")[1] for line in lines] == ["a happened", "b happened", "a again"]


def test_syslog_target_sends_each_level_with_its_priority_and_nothing_to_the_stream(monkeypatch):
    fake = FakeSyslog()
    monkeypatch.setitem(sys.modules, "syslog", fake)
    stream = io.StringIO()
    log = mpudp.Log(stream=stream, debug=True, target="syslog")
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    assert fake.opened == ("mpudp", FakeSyslog.LOG_PID, FakeSyslog.LOG_DAEMON)
    assert fake.lines == [(7, "d"), (6, "i"), (4, "w"), (3, "e")]
    assert stream.getvalue() == ""


def test_a_closed_stream_does_not_raise():
    stream = io.StringIO()
    log = mpudp.Log(stream=stream)
    stream.close()
    log.info("nobody listens")  # must not raise: a closed stderr cannot stop the relay
