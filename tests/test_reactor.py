"""Reactor and resolver sections of mpudp.py: timers on a fake clock, the selector path,
look-ups off the loop, and the address helpers."""

import gc
import io
import socket
import threading
import time
import weakref

import pytest

from conftest import FakeClock, run_for
import mpudp

WAIT_S = 5.0  # bound for waiting on a resolver thread (an event, not a sleep)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def log_stream():
    return io.StringIO()


@pytest.fixture
def reactor(clock, log_stream):
    r = mpudp.Reactor(clock=clock, log=mpudp.Log(stream=log_stream, clock=clock))
    yield r
    r.close()


class RecordingSelector:
    """Stands in for the selector: records each select() timeout, reports nothing ready."""

    def __init__(self):
        self.timeouts = []

    def select(self, timeout=None):
        self.timeouts.append(timeout)
        return []

    def close(self):
        pass


# -- timers ----------------------------------------------------------------------


def test_call_at_fires_in_deadline_order(reactor, clock):
    fired = []
    for delay in (3.0, 1.0, 2.0, 0.5):
        reactor.call_at(clock.now + delay, fired.append, delay)
    reactor.run_once(0)
    assert fired == []  # nothing due yet
    clock.advance(1.0)
    reactor.run_once(0)
    assert fired == [0.5, 1.0]
    clock.advance(5.0)
    reactor.run_once(0)
    assert fired == [0.5, 1.0, 2.0, 3.0]


def test_equal_deadlines_fire_in_scheduling_order(reactor, clock):
    fired = []
    when = clock.now + 1.0
    for i in range(50):
        reactor.call_at(when, fired.append, i)
    reactor.call_at(when - 0.5, fired.append, "early")
    clock.advance(1.0)
    reactor.run_once(0)
    assert fired == ["early"] + list(range(50))


def test_call_later_is_relative_to_the_clock(reactor, clock):
    fired = []
    clock.advance(100.0)
    timer = reactor.call_later(2.0, fired.append, "x")
    assert timer.when == clock.now + 2.0
    run_for(reactor, clock, 1.9, step=0.1)
    assert fired == []
    run_for(reactor, clock, 0.2, step=0.1)
    assert fired == ["x"]


def test_a_timer_fires_once(reactor, clock):
    fired = []
    reactor.call_later(1.0, fired.append, 1)
    run_for(reactor, clock, 5.0, step=0.5)
    assert fired == [1]
    assert reactor.pending_timers == 0


class Payload:
    pass


def test_cancel_prevents_firing_and_drops_references(reactor, clock):
    fired = []
    payload = Payload()
    ref = weakref.ref(payload)
    timer = reactor.call_later(1.0, fired.append, payload)
    keep = reactor.call_later(1.0, fired.append, "kept")
    reactor.cancel(timer)
    assert timer.cancelled
    assert timer.callback is None and timer.args == ()
    del payload
    gc.collect()
    assert ref() is None  # the heap still holds the Timer, but not its arguments
    reactor.cancel(timer)  # twice is fine
    reactor.cancel(None)  # None is fine
    clock.advance(2.0)
    reactor.run_once(0)
    assert fired == ["kept"]
    assert keep.cancelled is False


def test_a_callback_can_cancel_a_timer_due_in_the_same_pass(reactor, clock):
    fired = []
    later = []

    def first():
        fired.append("first")
        reactor.cancel(later[0])

    reactor.call_later(1.0, first)
    later.append(reactor.call_later(1.0, fired.append, "second"))
    clock.advance(1.0)
    reactor.run_once(0)
    assert fired == ["first"]


def test_heap_compaction_when_cancelled_exceed_half(reactor, clock):
    timers = [reactor.call_later(10.0 + i, lambda: None) for i in range(200)]
    assert len(reactor._heap) == 200
    for timer in timers[:64]:
        reactor.cancel(timer)
    assert len(reactor._heap) == 200  # a few dead entries are left for pop to discard
    sizes = []
    for timer in timers[64:101]:
        reactor.cancel(timer)
        sizes.append(len(reactor._heap))
    # 101 of 200 cancelled: more than half, so the heap was rebuilt without them.
    assert sizes[-1] == 99
    assert min(sizes) == 99 and max(sizes) == 200
    assert reactor.pending_timers == 99


def test_compacted_heap_still_fires_in_order(reactor, clock):
    fired = []
    timers = [reactor.call_at(clock.now + 1.0 + (i % 17) * 0.1, fired.append, i) for i in range(300)]
    cancelled = set(range(0, 300, 3)) | set(range(1, 300, 3))
    for i in sorted(cancelled):
        reactor.cancel(timers[i])
    assert len(reactor._heap) < 300
    clock.advance(10.0)
    reactor.run_once(0)
    kept = [i for i in range(300) if i not in cancelled]
    assert sorted(fired) == kept
    # deadline order, scheduling order within a deadline
    assert fired == sorted(kept, key=lambda i: ((i % 17), i))


def test_cancelling_a_fired_timer_does_not_count_as_dead_heap_entry(reactor, clock):
    fired = []
    for _ in range(100):
        timer = reactor.call_later(1.0, fired.append, 1)
        clock.advance(1.0)
        reactor.run_once(0)
        reactor.cancel(timer)  # as Client._schedule_heartbeat does with the timer that just ran
    assert len(fired) == 100
    dead = sum(1 for entry in reactor._heap if entry[2].cancelled)
    assert reactor._cancelled_in_heap == dead == 0


def test_timers_scheduled_during_a_pass_run_on_the_next_pass(reactor, clock):
    fired = []

    def schedule():
        fired.append("outer")
        reactor.call_at(clock.now, fired.append, "inner")  # due already
        reactor.call_later(0, fired.append, "inner2")

    reactor.call_later(0, schedule)
    reactor.run_once(0)
    assert fired == ["outer"]
    reactor.run_once(0)
    assert fired == ["outer", "inner", "inner2"]


def test_a_raising_callback_does_not_stop_others(reactor, clock, log_stream):
    fired = []

    def boom():
        raise RuntimeError("kaput")

    reactor.call_later(1.0, fired.append, 1)
    reactor.call_later(1.0, boom)
    reactor.call_later(1.0, fired.append, 2)
    reactor.call_later(1.0, boom)
    clock.advance(1.0)
    reactor.run_once(0)
    assert fired == [1, 2]
    assert reactor.errors["callback"] == 2
    assert "internal error in" in log_stream.getvalue()
    assert "RuntimeError: kaput" in log_stream.getvalue()
    assert log_stream.getvalue().count("kaput") == 1  # rate-limited per callback


# -- periodic ----------------------------------------------------------------------


def test_call_every_rearms_from_the_scheduled_time_without_drift(reactor, clock):
    start = clock.now
    interval = 1.0
    fired = []
    periodic = reactor.call_every(interval, lambda: fired.append(clock.now))
    scheduled = []
    for k in range(1, 21):
        clock.now = start + k * interval + 0.4  # every pass runs 0.4 s late
        reactor.run_once(0)
        scheduled.append(periodic.timer.when)
    assert len(fired) == 20
    # Drift would accumulate the 0.4 s: next deadline = start + (k + 1) * interval exactly.
    assert scheduled == [start + (k + 1) * interval for k in range(1, 21)]


def test_call_every_fine_steps(reactor, clock):
    start = clock.now
    fired = []
    reactor.call_every(0.25, lambda: fired.append(clock.now))
    run_for(reactor, clock, 10.0, step=0.1)
    assert len(fired) == 40
    for k, when in enumerate(fired, 1):
        assert start + k * 0.25 <= when < start + k * 0.25 + 0.1 + 1e-9


def test_call_every_skips_missed_ticks_after_a_stall(reactor, clock):
    fired = []
    periodic = reactor.call_every(1.0, lambda: fired.append(clock.now))
    run_for(reactor, clock, 3.0, step=0.5)
    assert len(fired) == 3
    clock.advance(30.7)  # the process was stopped for half a minute
    reactor.run_once(0)
    assert len(fired) == 4  # one call, not 30
    reactor.run_once(0)
    assert len(fired) == 4
    assert clock.now < periodic.timer.when <= clock.now + 1.0
    run_for(reactor, clock, 5.0, step=0.5)
    assert len(fired) == 9


def test_call_every_survives_a_raising_callback_and_cancel_stops_it(reactor, clock):
    calls = []

    def flaky():
        calls.append(clock.now)
        raise ValueError("again")

    periodic = reactor.call_every(1.0, flaky)
    run_for(reactor, clock, 5.0, step=0.5)
    assert len(calls) == 5
    assert reactor.errors["callback"] == 5
    periodic.cancel()
    run_for(reactor, clock, 5.0, step=0.5)
    assert len(calls) == 5


def test_periodic_can_cancel_itself_from_its_callback(reactor, clock):
    calls = []
    holder = []

    def once():
        calls.append(1)
        holder[0].cancel()

    holder.append(reactor.call_every(1.0, once))
    run_for(reactor, clock, 5.0, step=0.5)
    assert calls == [1]


# -- run_once and the selector ---------------------------------------------------


def test_run_once_timeout_from_the_earliest_timer(reactor, clock):
    fake = RecordingSelector()
    real = reactor.selector
    reactor.selector = fake
    try:
        reactor.run_once()
        assert fake.timeouts[-1] is None  # no timers: wait for sockets only
        reactor.run_once(0.5)
        assert fake.timeouts[-1] == 0.5
        reactor.call_later(5.0, lambda: None)
        reactor.call_later(3.0, lambda: None)
        reactor.run_once()
        assert fake.timeouts[-1] == pytest.approx(3.0)
        reactor.run_once(1.0)
        assert fake.timeouts[-1] == pytest.approx(1.0)
        reactor.run_once(10.0)
        assert fake.timeouts[-1] == pytest.approx(3.0)
        clock.advance(4.0)  # one timer overdue: do not wait at all
        reactor.call_later(-1.0, lambda: None)
        reactor.run_once()
        assert fake.timeouts[-1] == 0.0
    finally:
        reactor.selector = real


def test_readable_socket_handler_is_called(reactor):
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        got = []

        def on_readable():
            got.append(b.recv(100))

        reactor.add_reader(b, on_readable)
        reactor.run_once(0)
        assert got == []  # nothing to read: not called
        a.send(b"ping")
        reactor.run_once(1.0)  # returns as soon as b is readable
        assert got == [b"ping"]
        reactor.remove_reader(b)
        reactor.remove_reader(b)  # twice is fine
        a.send(b"again")
        reactor.run_once(0)
        assert got == [b"ping"]
    finally:
        a.close()
        b.close()


def test_a_raising_socket_handler_is_guarded(reactor):
    a, b = socket.socketpair()
    try:
        def bad():
            b.recv(100)
            raise KeyError("x")

        reactor.add_reader(b, bad)
        fired = []
        reactor.call_later(0, fired.append, "timer")
        a.send(b"1")
        reactor.run_once(1.0)
        assert reactor.errors["callback"] == 1
        assert fired == ["timer"]
    finally:
        reactor.remove_reader(b)
        a.close()
        b.close()


def test_stop_ends_run(reactor, clock):
    fired = []
    reactor.call_later(0, fired.append, 1)
    reactor.call_later(0, reactor.stop)
    reactor.call_later(0, fired.append, 2)  # same pass: still runs
    reactor.call_later(3600.0, fired.append, "never")
    done = threading.Event()

    def target():
        reactor.run()
        done.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert done.wait(WAIT_S), "run() did not return after stop()"
    assert fired == [1, 2]
    # run() can be entered again after a stop.
    reactor.call_later(0, reactor.stop)
    reactor.run()


def test_log_every_rate_limits_by_key(clock):
    stream = io.StringIO()
    log = mpudp.Log(stream=stream, clock=clock)
    for _ in range(5):
        log.every("k", 10.0, "warn", "repeated")
    clock.advance(10.0)
    log.every("k", 10.0, "warn", "repeated")
    log.every("other", 10.0, "warn", "another")
    text = stream.getvalue()
    assert text.count("repeated") == 2
    assert text.count("another") == 1
    log.debug("hidden")
    assert "hidden" not in stream.getvalue()


# -- resolver ----------------------------------------------------------------------


def answer(ip, port):
    return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", (ip, port))]


def text(host):
    """getaddrinfo takes the host as str or bytes; the fakes accept both."""
    return host.decode("ascii") if isinstance(host, bytes) else host


def pump(reactor, predicate, timeout=WAIT_S):
    """Run the loop until predicate() holds; the resolver's wake-up is a real socket."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the resolver")
        reactor.run_once(0.05)


def test_resolver_callback_runs_on_the_loop_thread(reactor):
    worker_threads = []

    def fake_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        worker_threads.append(threading.current_thread())
        assert text(host) == "relay.example"
        assert type == socket.SOCK_DGRAM
        return answer("192.0.2.7", port)

    resolver = mpudp.Resolver(reactor, getaddrinfo=fake_getaddrinfo)
    try:
        results = []
        assert resolver.lookup("k", "relay.example", 5000,
                               lambda r: results.append((r, threading.current_thread())))
        pump(reactor, lambda: results)
        (result, thread), = results
        assert result == (socket.AF_INET, ("192.0.2.7", 5000))
        assert thread is threading.main_thread()
        assert worker_threads and worker_threads[0] is not threading.main_thread()
    finally:
        resolver.close()


@pytest.mark.parametrize("failure", [
    socket.gaierror(-2, "Name or service not known"),
    UnicodeError("label too long"),
    ValueError("a broken resolver library"),
    "empty",
])
def test_resolver_errors_come_back_as_oserror(reactor, failure):
    def fake_getaddrinfo(host, port, *args):
        if failure == "empty":
            return []
        raise failure

    resolver = mpudp.Resolver(reactor, getaddrinfo=fake_getaddrinfo)
    try:
        results = []
        resolver.lookup("k", "bad.example", 53, results.append)
        pump(reactor, lambda: results)
        assert isinstance(results[0], OSError)
        # Once answered, the key is free for the next look-up.
        assert resolver.lookup("k", "bad.example", 53, results.append) is True
        pump(reactor, lambda: len(results) == 2)
    finally:
        resolver.close()


def test_hanging_getaddrinfo_does_not_block_the_loop(reactor, clock):
    release = threading.Event()
    entered = threading.Event()

    def hanging_getaddrinfo(host, port, *args):
        entered.set()
        release.wait(30)
        return answer("198.51.100.1", port)

    resolver = mpudp.Resolver(reactor, getaddrinfo=hanging_getaddrinfo)
    results = []
    try:
        assert resolver.lookup("same", "slow.example", 1, results.append) is True
        assert entered.wait(WAIT_S)
        ticks = []
        reactor.call_every(0.25, ticks.append, 1)
        started = time.monotonic()
        run_for(reactor, clock, 1.0, step=0.25)  # timers keep running while DNS hangs
        assert time.monotonic() - started < 2.0
        assert len(ticks) == 4
        assert results == []
        assert resolver.lookup("same", "slow.example", 1, results.append) is False  # in flight
        assert resolver.lookup("other", "slow.example", 2, results.append) is True
        release.set()
        pump(reactor, lambda: len(results) == 2)
        assert sorted(r[1][1] for r in results) == [1, 2]
        assert resolver.lookup("same", "slow.example", 1, results.append) is True
        pump(reactor, lambda: len(results) == 3)
    finally:
        release.set()
        resolver.close()


def test_a_raising_resolver_callback_does_not_strand_other_results(reactor):
    gates = {"a": threading.Event(), "b": threading.Event()}

    def gated_getaddrinfo(host, port, *args):
        gates[text(host)].wait(30)
        return answer("203.0.113.9", port)

    resolver = mpudp.Resolver(reactor, getaddrinfo=gated_getaddrinfo)
    got = []

    def raising(result):
        raise OSError("cannot open a socket for this address family")

    def dns_threads():
        return set(t for t in threading.enumerate() if t.name == "mpudp-dns")

    try:
        before = dns_threads()
        resolver.lookup("a", "a", 1, raising)
        (worker_a,) = dns_threads() - before
        resolver.lookup("b", "b", 2, got.append)
        (worker_b,) = dns_threads() - before - {worker_a}
        # "a" finishes first, then "b": both results wait for one delivery pass.
        gates["a"].set()
        worker_a.join(WAIT_S)
        gates["b"].set()
        worker_b.join(WAIT_S)
        assert not worker_a.is_alive() and not worker_b.is_alive()
        reactor.run_once(0)
        reactor.run_once(0)
        assert got == [(socket.AF_INET, ("203.0.113.9", 2))]
        assert resolver.lookup("b", "b", 2, got.append) is True
    finally:
        for gate in gates.values():
            gate.set()
        resolver.close()


# -- address helpers -----------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("1.2.3.4:5000", ("1.2.3.4", 5000)),
    ("[::1]:5000", ("::1", 5000)),
    (":5000", ("", 5000)),
    ("host.example:53", ("host.example", 53)),
    ("[240c::1]:65535", ("240c::1", 65535)),
    ("  10.0.0.1:0 ", ("10.0.0.1", 0)),
    ("[fe80::1%eth0]:9", ("fe80::1%eth0", 9)),
])
def test_split_host_port_good(text, expected):
    assert mpudp.split_host_port(text) == expected


@pytest.mark.parametrize("text", [
    "1.2.3.4", "::1:5000", "[::1]5000", "h:99999", "h:-1", "h:", "", "[]:5000", "[::1]:", "h:5x", "h:+5",
    "[::1]:5000]",
    "h:\uff15\uff10\uff10\uff10",  # fullwidth digits: str.isdigit() says yes
    "h:\u00b2",  # superscript two: isdigit() yes, int() no
    "h:\u0665",  # Arabic-Indic five
])
def test_split_host_port_bad(text):
    with pytest.raises(ValueError):
        mpudp.split_host_port(text)


def test_numeric_address():
    family, addr = mpudp.numeric_address("1.2.3.4", 5000)
    assert family == socket.AF_INET and addr == ("1.2.3.4", 5000)
    family, addr = mpudp.numeric_address("::1", 53)
    assert family == socket.AF_INET6 and addr[:2] == ("::1", 53)
    assert mpudp.numeric_address("host.example", 53) is None
    assert mpudp.numeric_address("1.2.3", 53) is None or mpudp.numeric_address("1.2.3", 53)[0] == socket.AF_INET
    assert mpudp.numeric_address("b\u00fccher.example", 53) is None


def test_format_address():
    assert mpudp.format_address(None) == "-"
    assert mpudp.format_address(("1.2.3.4", 5000)) == "1.2.3.4:5000"
    assert mpudp.format_address(("::1", 5000, 0, 0)) == "[::1]:5000"
    assert mpudp.format_address(("::ffff:192.0.2.1", 7, 0, 0)) == "192.0.2.1:7"  # dual-stack listen socket
    assert mpudp.format_address(("::ffff:1:2", 7, 0, 0)) == "[::ffff:1:2]:7"
    # format and split are inverses for literal addresses
    for text in ("192.0.2.1:7", "[2001:db8::2]:65000"):
        host, port = mpudp.split_host_port(text)
        assert mpudp.format_address((host, port)) == text


def test_a_reader_removed_by_an_earlier_handler_in_the_same_pass_is_not_called(reactor):
    """Two sockets readable in one select(); the first handler closes the second (a link
    whose interface went away): its handler must not run on the closed socket."""
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        calls = []
        readers = [b for _a, b in pairs]

        def handler(i):
            calls.append(i)
            other = readers[1 - i]
            reactor.remove_reader(other)

        for i, b in enumerate(readers):
            b.setblocking(False)
            reactor.add_reader(b, lambda i=i: handler(i))
        for a, _b in pairs:
            a.send(b"x")
        reactor.run_once(1.0)
        assert len(calls) == 1  # whichever ran first removed the other
    finally:
        for a, b in pairs:
            a.close()
            b.close()
