"""Hostile network, HELLO and COOKIE abuse: a HELLO without a fresh cookie for its
address leaves no state; pending epochs and HELLO answers per sweep are bounded; captured
and replayed HELLOs cannot starve a client's new handshake, however many; a restarted
client whose nonce collides with the epoch the server still holds moves on.

A real Server and Client in this process (conftest.InProcess on a fake clock); the test
knows the keys, so it captures genuine HELLOs of new client runs and replays them.
"""

import collections

import pytest

import mpudp
from helpers import drain, handshake_value, header, kind, seal_hello, udp_socket, wait_until

HELLO, WELCOME, COOKIE = mpudp.TYPE_HELLO, mpudp.TYPE_WELCOME, mpudp.TYPE_COOKIE


def with_cookie(static, hello, cookie):
    """A HELLO again with `cookie` in it: only the holder of the static key can make this."""
    _flags, _link, client_id, _session, _nonce = header(hello)
    return seal_hello(static, client_id, hello[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + mpudp.NONCE_SIZE], cookie)


def captured_hellos(r, n):
    """The first HELLO of each of `n` new runs of the rig's client, captured on their way
    (never delivered): valid, distinct, and in whatever format the client uses.

    A run whose nonce has the 16-bit tag of the epoch the server is running is left out:
    the server takes that HELLO for a replay and answers nothing (one run in 65,536; the
    client's way out is tested by test_restarted_client_with_a_colliding_epoch_tag_...)."""
    capture = udp_socket(blocking=False)
    cfg = dict(r.client_cfg, links=[{"remote_addr": "%s:%d" % capture.getsockname()}])
    section = mpudp.parse_config({"mode": "client", "client": cfg}).section

    def one_run():
        captured = []
        client = mpudp.Client(section, r.reactor, r.log, r.resolver)
        client.start()  # says HELLO at once
        client.close()
        wait_until(lambda: captured.extend(d for d, _ in drain(capture) if kind(d) == HELLO) or captured,
                   what="a captured HELLO", interval=0.001)
        return captured

    running_tag = r.peer.epoch.tag
    hellos, runs = [], 0
    while len(hellos) < n:
        runs += 1
        assert runs <= n + 10, "the server's epoch tag came up in more than 10 of %d runs" % runs
        hellos.extend(h for h in one_run() if mpudp.epoch_tag(h[mpudp.HEADER_SIZE:]) != running_tag)
    capture.close()
    assert len({h[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + mpudp.NONCE_SIZE] for h in hellos}) == n
    return hellos


def first_hello(r):
    return captured_hellos(r, 1)[0]


def get_cookie(r, sock, hello):
    """Send `hello` from `sock` and return the cookie the server answers with."""
    nonce = hello[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + mpudp.NONCE_SIZE]
    found = []
    sock.sendto(hello, r.server_addr)
    assert r.settle(lambda: found.extend(
        v for v in (handshake_value(d, nonce) for d, _ in drain(sock)) if v is not None) or found)
    return found[0]


# ============================================================================
# Cookies and limits
# ============================================================================


def test_hellos_without_a_fresh_cookie_leave_no_state(rig):
    """A HELLO with no cookie, an old one, or one made for another address gets a COOKIE (the
    same size) and creates nothing; the same HELLO with a fresh cookie gets a WELCOME."""
    r = rig()
    hello = first_hello(r)
    attacker, other = udp_socket(blocking=False), udp_socket(blocking=False)
    pending = dict(r.peer.pending)
    cookie = get_cookie(r, attacker, hello)  # no cookie: a COOKIE back, no state
    assert r.peer.pending == pending and r.server.counters["hello_limit"] == 0
    for sender, hello_sent in ((other, with_cookie(r.client.static, hello, cookie)),  # made for `attacker`
                               (attacker, with_cookie(r.client.static, hello, bytes(range(16))))):
        assert get_cookie(r, sender, hello_sent) is not None  # a COOKIE again, not a WELCOME
        assert r.peer.pending == pending
    r.run(2 * mpudp.COOKIE_PERIOD_S + 0.1, step=1.0)  # the cookie grows old
    assert get_cookie(r, attacker, with_cookie(r.client.static, hello, cookie)) != cookie
    assert r.peer.pending == pending
    fresh = get_cookie(r, attacker, hello)
    attacker.sendto(with_cookie(r.client.static, hello, fresh), r.server_addr)
    welcomes = []
    assert r.settle(lambda: welcomes.extend(d for d, _ in drain(attacker) if kind(d) == WELCOME) or welcomes)
    assert len(r.peer.pending) == len(pending) + 1
    attacker.close()
    other.close()


def test_pending_epochs_and_hello_answers_are_bounded(rig):
    r = rig()
    per_sweep = 2 * mpudp.HELLOS_PER_SWEEP
    hellos = captured_hellos(r, 3 * per_sweep)  # valid and distinct: many client runs
    attacker = udp_socket(blocking=False)
    epoch = r.peer.epoch
    for sweep in range(3):
        r.run(mpudp.SWEEP_INTERVAL_CEILING_S + 0.1, step=0.05)  # a sweep refills the budget
        answered = []
        for hello in hellos[sweep * per_sweep:(sweep + 1) * per_sweep]:
            hello = with_cookie(r.client.static, hello, get_cookie(r, attacker, hello))
            before = len(answered) + sum(r.server.counters.values())
            attacker.sendto(hello, r.server_addr)
            assert r.settle(lambda: answered.extend(d for d, _ in drain(attacker))
                            or len(answered) + sum(r.server.counters.values()) == before + 1)
            assert len(r.peer.pending) <= mpudp.PENDING_EPOCHS_PER_CLIENT
        assert all(kind(d) == WELCOME and len(d) == mpudp.OVERHEAD + mpudp.WELCOME_PAYLOAD.size for d in answered)
        assert len(answered) == mpudp.HELLOS_PER_SWEEP, "sweep %d: %d WELCOMEs" % (sweep, len(answered))
    assert r.server.counters["hello_limit"] == 3 * (per_sweep - mpudp.HELLOS_PER_SWEEP)
    assert r.peer.epoch is epoch, "HELLOs must not displace the running epoch"
    assert r.reactor.errors["callback"] == 0
    assert r.round_trip(b"still works")
    attacker.close()


def test_restarted_client_with_a_colliding_epoch_tag_still_connects(rig):
    """A restarted client whose first HELLO nonce has the tag of the epoch the server still
    holds for its previous run: the server takes that HELLO for a replay, so the client must
    move on to a new nonce (HELLO_TRIES_PER_NONCE) rather than retry the same one forever."""
    r = rig()
    tag = r.client.epoch.tag
    r.client.close()  # the client dies without a word; the server keeps its epoch
    real_urandom = mpudp.os.urandom
    first = {"nonce": True}

    def urandom(n):
        if n == mpudp.NONCE_SIZE and first["nonce"]:
            first["nonce"] = False
            return bytes([tag >> 8, tag & 0xFF]) + real_urandom(n - 2)
        return real_urandom(n)

    mpudp.os.urandom = urandom
    try:
        r.client = r.start_client()
    finally:
        mpudp.os.urandom = real_urandom
    r.run_until(lambda: r.client.epoch is not None, 10.0, step=0.05)
    assert r.client.epoch is not None, "no handshake in 10 s; server counters %s" % dict(r.server.counters)
    assert r.client.epoch.tag != tag and r.server.counters["replay"] >= 1
    assert r.round_trip(b"after the clash")


# ============================================================================
# Replayed HELLOs cannot starve a new handshake
# ============================================================================


class HelloRace:
    """Old HELLOs against a client's new one, the attacker always first after a sweep.

    An attacker sending a few thousand HELLOs a second is, after each sweep refills the
    budget, ahead of a client that retries every heartbeat almost every time; here it is
    every time.  It is adaptive, as a real one can be: a HELLO that got a WELCOME goes to the
    back of its queue (the server will remember that nonce for a while), the others stay in front.
    """

    def __init__(self, r, stash, fresh):
        self.r, self.fresh, self.static = r, fresh, r.client.static
        self.queue = collections.deque(stash)
        self.attacker, self.client = udp_socket(blocking=False), udp_socket(blocking=False)
        self.client_answered = False

    def _send_and_settle(self, sock, packets):
        """Send, then pump until the server has dealt with each (a WELCOME or a counted drop)."""
        r = self.r
        before = sum(r.server.counters.values())
        answers = []

        def done():
            answers.extend(d for d, _ in drain(sock) if kind(d) in (WELCOME, COOKIE))
            return len(answers) + sum(r.server.counters.values()) - before >= len(packets)

        for packet in packets:
            sock.sendto(packet, r.server_addr)
        assert r.settle(done)
        nonce = lambda data: data[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + mpudp.NONCE_SIZE]  # noqa: E731
        self.cookie = next((a[mpudp.HEADER_SIZE + 16:mpudp.HEADER_SIZE + 32] for a in answers if kind(a) == COOKIE), None)
        return {nonce(a) for a in answers if kind(a) == WELCOME}

    def step(self, seconds):
        self.r.clock.advance(seconds)
        self.r.pump()  # timers first: a sweep refills the budget here
        burst = [self.queue.popleft() for _ in range(min(mpudp.HELLOS_PER_SWEEP + 1, len(self.queue)))]
        answered = self._send_and_settle(self.attacker, burst)
        nonce = lambda hello: hello[mpudp.HEADER_SIZE:mpudp.HEADER_SIZE + mpudp.NONCE_SIZE]  # noqa: E731
        self.queue.extendleft(reversed([h for h in burst if nonce(h) not in answered]))
        self.queue.extend(h for h in burst if nonce(h) in answered)
        # The attacker cannot put the COOKIEs it gets into its HELLOs (the MAC covers them); the client can.
        if self._send_and_settle(self.client, [self.fresh]) or (
                self.cookie is not None
                and self._send_and_settle(self.client, [with_cookie(self.static, self.fresh, self.cookie)])):
            self.client_answered = True
        return self.client_answered

    def close(self):
        self.attacker.close()
        self.client.close()


def test_replayed_old_hellos_cannot_starve_a_new_handshake(rig):
    """HELLOs captured from 9 earlier client runs, replayed after every sweep, used up the HELLO
    budget (HELLOS_PER_SWEEP) before the client's new HELLO, sweep after sweep, for ever."""
    r = rig()
    r.client.close()  # the client's old run is gone; its new run says HELLO below
    race = HelloRace(r, captured_hellos(r, mpudp.HELLOS_PER_SWEEP + 1), first_hello(r))
    sweeps = 3
    for _ in range(int(sweeps * mpudp.SWEEP_INTERVAL_CEILING_S / 0.2) + 2):
        if race.step(0.2):  # the client retries every 0.2 s
            break
    assert race.client_answered, "refused for %d sweeps: %s" % (sweeps, dict(r.server.counters))
    race.close()


class StillStarved(AssertionError):
    """The client's new handshake was refused for the whole run."""


def test_a_large_stash_of_captured_hellos_cannot_starve_a_new_handshake(rig):
    remembered = getattr(mpudp, "SEEN_HELLOS_PER_CLIENT", 1024)
    if remembered > 4096:
        pytest.skip("too many HELLOs to capture in a unit test")
    r = rig()
    r.client.close()
    stash = captured_hellos(r, remembered + 2 * (mpudp.HELLOS_PER_SWEEP + 1))
    race = HelloRace(r, stash, first_hello(r))
    sweeps = remembered // mpudp.HELLOS_PER_SWEEP + 5  # long enough for the oldest to be forgotten
    step_s = 1.0  # the client retries every second
    for _ in range(int(sweeps * mpudp.SWEEP_INTERVAL_CEILING_S / step_s)):
        if race.step(step_s):
            break
    race.close()
    if not race.client_answered:
        raise StillStarved("refused for %d sweeps (%.0f s): %s" % (
            sweeps, sweeps * mpudp.SWEEP_INTERVAL_CEILING_S, dict(r.server.counters)))
