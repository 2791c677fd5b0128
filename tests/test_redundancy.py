"""End-to-end tests of `redundancy`: every packet on the N best links, and "auto".

With `redundancy` N >= 2 the client sends each datagram of a local application
on the N best up links (the active one first), all copies under one sequence
number: the server forwards the first to arrive and its replay window drops the
rest (counter "duplicate"); it sends each reply back on the same links, and the
client drops the copies the same way.  "auto" adds a second copy only while the
active link has missed one of its last AUTO_REDUNDANCY_HEARTBEATS heartbeats.

Each test runs real processes (conftest.RelayPair: echo upstream, server, two
LinkEmulators, client) and an application stream of numbered datagrams, and
checks what arrived where: at the echo upstream (one-way, client to server),
back at the application (the round trip), in the emulators' counters, in the
client's score_file and the server's status_file, and in the log lines.

Heartbeats are 40 bytes on the wire (32 bytes of overhead + 8); the emulators
count datagrams, not bytes, so "a link carries the stream" is told by its
datagram count growing by at least the stream's length, and "it does not" by
growing by less than half of it (heartbeats alone: ~5 a second per link at the
fixture's 0.2 s interval, up to ~20 a second with fast probes).

Every wait is bounded (helpers.WAIT_S) and waits on an event (a log line, a
datagram, a counter, a status file that says so); the only sleeps pace the
stream and the polling of a status file (a file has no change notification).
Figures are printed with `pytest -s`.
"""

import re
import time

import pytest

import mpudp
from conftest import active_index, read_json, wait_json
from helpers import WAIT_S, Stream, line_count, lines_from, link_name, reporter

report = reporter("redundancy")


# -- log lines ---------------------------------------------------------------


def sending_on(pair, *indices):
    """The client's line for the links that carry data: "sending on link 0 (…) + link 1 (…)"."""
    return "sending on " + " + ".join(link_name(pair, i) for i in indices)


def assert_no_internal_error(pair):
    for proc in (pair.client, pair.server):
        output = proc.output()
        assert "internal error" not in output and "Traceback" not in output, output[-3000:]
        assert proc.proc.poll() is None, "exited with %r:\n%s" % (proc.proc.poll(), output[-3000:])


# -- score_file and status_file -----------------------------------------------


def fresh_json(path, predicate=lambda data: True, what="a fresh write", timeout=WAIT_S):
    """The first content written after now (its "time" field) for which predicate(data) holds."""
    after = time.time()
    return wait_json(path, lambda d: d["time"] > after and predicate(d), what, timeout)


def settled(score):
    return all(link["state"] == "up" and link["steady"] for link in score["links"])


def pair_with_files(relay_pair, tmp_path, **client):
    """A RelayPair with two links, a client score_file and a server status_file written every second."""
    cfg = {"score_file": str(tmp_path / "score.json")}
    cfg.update(client)
    # heartbeat_timeout_sec 2: the server's sweep, which writes the status_file, runs every second.
    server = {"status_file": str(tmp_path / "status.json"), "heartbeat_timeout_sec": 2}
    pair = relay_pair(links=2, client=cfg, server=server)
    pair.score_file, pair.status_file = cfg["score_file"], server["status_file"]
    return pair


def counters_of(links):
    return [link.counters for link in links]


def grew(before, links, key):
    """How much counter `key` grew on each emulator since the snapshot `before`."""
    return [link.counters[key] - b[key] for link, b in zip(links, before)]


# -- an application stream ----------------------------------------------------


@pytest.fixture
def streams():
    """A factory for Stream; every stream is stopped at the end of the test."""
    made = []

    def make(*args, **kwargs):
        stream = Stream(*args, **kwargs)
        made.append(stream)
        return stream

    yield make
    for stream in made:
        stream.stop()


def exactly_once(counts, count):
    """(missing numbers, numbers seen more than once) of 1..count in `counts`."""
    missing = [seq for seq in range(1, count + 1) if counts[seq] == 0]
    repeated = {seq: n for seq, n in counts.items() if n > 1}
    return missing, repeated


# ============================================================================
# 1. redundancy 2: the active link blackholed mid-stream loses nothing
# ============================================================================


@pytest.mark.slow
def test_blackholed_link_loses_nothing_with_two_copies(relay_pair, tmp_path, streams):
    """Both links carry the stream; the active one dies after 2 s and stays dead.  Not one
    datagram is lost either way (without copies a failover loses ~0.5 s of traffic), none
    reaches the upstream or the application twice, and the client drops to the one link left."""
    count, rate, dead_after = 800, 100, 200
    pair = pair_with_files(relay_pair, tmp_path, redundancy=2)
    score = wait_json(pair.score_file, lambda d: settled(d) and d["copies"] == 2,
                      "both links up, steady, and carrying copies")
    dead = active_index(score)
    alive = 1 - dead
    assert [link["carrier"] for link in score["links"]] == [True, True], score["links"]
    start = line_count(pair.client)
    before = counters_of(pair.links)

    stream = streams(pair.client_address, count, rate=rate, size=200)
    stream.wait_sent(dead_after)
    stream.wait_echoes(dead_after - 20)  # flowing: a few may still be on their way
    both = grew(before, pair.links, "up_out")
    pair.links[dead].set(blackhole=True)
    blackholed_at = time.monotonic()
    down = pair.client.wait_for_line("%s down after" % link_name(pair, dead), start=start)
    detected = time.monotonic() - blackholed_at
    single = pair.client.wait_line_ending(sending_on(pair, alive), start)
    stream.finish()

    missing, repeated = exactly_once(stream.replies(), count)
    assert not missing, "%d datagrams lost end-to-end: %r" % (len(missing), missing[:20])
    assert not repeated, "delivered twice to the application: %r" % dict(list(repeated.items())[:20])
    missing, repeated = exactly_once(stream.upstream(pair.echo), count)
    assert not missing, "%d datagrams never reached the upstream: %r" % (len(missing), missing[:20])
    assert not repeated, "forwarded twice to the upstream: %r" % dict(list(repeated.items())[:20])

    # Both links really carried the stream before the blackhole (heartbeats alone: ~10 each)...
    assert min(both) >= dead_after - 20, "datagrams forwarded per link before the blackhole: %r" % both
    # ...so the server saw (and dropped) copies, and so did the client.
    status = wait_json(pair.status_file, lambda d: d["counters"].get("duplicate", 0) > 0,
                       "server counter duplicate > 0")
    client = fresh_json(pair.score_file, lambda d: d["copies"] == 1, "one copy, on the link left")
    assert client["counters"].get("duplicate", 0) > 0, client["counters"]
    assert [link["carrier"] for link in client["links"]] == [i == alive for i in range(2)], client["links"]
    assert active_index(client) == alive
    # The copies stop when the dead link is declared down (the same evaluation), and only then.
    lines = lines_from(pair.client, start)
    assert single > down, "\n".join(lines)
    assert sum(1 for line in lines if "sending on" in line) == 1, "\n".join(lines)
    report("redundancy 2, link %d blackholed at %d pps: %d of %d echoed exactly once, down after %.2fs; "
           "duplicates dropped: server %d, client %d" % (dead, rate, len(stream.replies()), count, detected,
                                                         status["counters"]["duplicate"],
                                                         client["counters"]["duplicate"]))
    assert_no_internal_error(pair)


# ============================================================================
# 2. Independent loss on both links: copies multiply the loss rates
# ============================================================================


@pytest.mark.slow
@pytest.mark.parametrize("redundancy, count, low, high", [
    (2, 1500, 0.01, 0.09),  # 0.2 * 0.2 = 4 %; 1 % .. 9 % is more than 6 standard deviations wide
    (1, 600, 0.12, 0.28),   # one link: 20 %, +-5 standard deviations
], ids=["two-copies", "one-copy"])
def test_independent_loss_is_multiplied_away(relay_pair, tmp_path, streams, redundancy, count, low, high):
    # 20 % each way loses 36 % of the heartbeats: a streak of 5 misses (the default
    # max_consecutive_fail) comes about every 50 s per link (on one of the two every ~25 s), the
    # link is declared down, its copies stop, and with both down the client re-handshakes.  The feature under test is the copies,
    # not the down detection: a link is never declared down here.
    pair = pair_with_files(relay_pair, tmp_path, redundancy=redundancy, max_consecutive_fail=50)
    wait_json(pair.score_file, lambda d: settled(d) and d["copies"] == redundancy,
              "both links up, steady, %d copies" % redundancy)
    for link in pair.links:
        link.set(loss_up=0.2, loss_down=0.2)
    before = counters_of(pair.links)

    stream = streams(pair.client_address, count, rate=200, size=100)
    stream.finish()
    upstream = stream.upstream(pair.echo)
    replies = stream.replies()
    delivered_up = len(upstream)
    loss_up = 1.0 - delivered_up / count
    loss_down = 1.0 - len(replies) / max(1, delivered_up)
    link_loss = [dropped / max(1, arrived) for dropped, arrived in zip(
        grew(before, pair.links, "up_dropped"), grew(before, pair.links, "up_in"))]
    score = read_json(pair.score_file)
    report("redundancy %d, 20%%/20%% loss on both links, %d datagrams at 200 pps: delivered loss "
           "client->server %.1f%%, server->client %.1f%%, round trip %.1f%% (each link alone: %.1f%% / %.1f%% "
           "up); copies now %d" % (redundancy, count, 100 * loss_up, 100 * loss_down,
                                   100 * (1 - len(replies) / count), 100 * link_loss[0], 100 * link_loss[1],
                                   score["copies"]))
    assert not [n for n in upstream.values() if n > 1], "a datagram reached the upstream twice"
    assert not [n for n in replies.values() if n > 1], "a reply reached the application twice"
    assert low <= loss_up <= high, "delivered loss client->server %.3f, expected %.2f..%.2f" % (loss_up, low, high)
    assert low <= loss_down <= high, "delivered loss server->client %.3f, expected %.2f..%.2f" % (
        loss_down, low, high)
    if redundancy == 2:  # both links carried the stream: each one's own loss is measured on ~count datagrams
        assert all(0.15 < loss < 0.25 for loss in link_loss), "the emulators' own loss: %r" % link_loss
        assert loss_up < min(link_loss) / 2, "copies barely helped: %.3f against %r" % (loss_up, link_loss)
    assert pair.client.count_lines(" down after ") == 0, "a link was declared down:\n" + pair.client.output()
    assert_no_internal_error(pair)


# ============================================================================
# 3. "auto": a second copy only while the active link loses heartbeats
# ============================================================================


@pytest.mark.slow
def test_auto_adds_a_copy_while_the_active_link_loses(relay_pair, tmp_path, streams):
    # A lossy active link is not left here, so that only "auto" decides what carries data:
    # switch_threshold 1000 (50 % heartbeat loss costs ~250 points) and max_consecutive_fail 50
    # (at 50 % loss a streak of 5 misses comes every few seconds; one of 50, never).
    pair = pair_with_files(relay_pair, tmp_path, redundancy="auto", heartbeat_interval_sec=0.1,
                           switch_threshold=1000, max_consecutive_fail=50)
    count = 150  # 1.5 s of the stream per phase
    # Clean links: one copy.  A heartbeat late under load (its timeout is 0.1 s here) is a miss,
    # and a real reason for a copy: such a window proves nothing and is run again (3 times at most).
    for attempt in range(3):
        score = wait_json(pair.score_file, lambda d: settled(d) and d["copies"] == 1
                          and d["links"][active_index(d)]["loss"] == 0, "one copy on a link without misses")
        lossy = active_index(score)
        other = 1 - lossy
        start = line_count(pair.client)
        before = counters_of(pair.links)
        stream = streams(pair.client_address, count, rate=100, size=200, tag=b"cln%d" % attempt)
        stream.finish()
        after = fresh_json(pair.score_file)
        if after["links"][lossy]["loss"] == 0 and active_index(after) == lossy:
            break
        report("auto: clean window %d had a missed heartbeat (loaded machine?), again" % attempt)
    else:
        pytest.fail("the active link missed heartbeats in 3 windows of %d datagrams without any loss" % count)
    extra = grew(before, pair.links, "up_in")[other]
    assert [line for line in lines_from(pair.client, start) if "sending on" in line] == []
    assert extra < count / 2, "link %d forwarded %d datagrams while %d went out on the active one" % (
        other, extra, count)
    assert exactly_once(stream.replies(), count) == ([], {})

    # The active link loses half of what it carries to the server: a copy goes on the other one.
    start = line_count(pair.client)
    before = counters_of(pair.links)
    pair.links[lossy].set(loss_up=0.5)
    lossy_at = time.monotonic()
    stream = streams(pair.client_address, 3 * count, rate=100, size=200, tag=b"loss")
    both = pair.client.wait_for_line(sending_on(pair, lossy, other), start=start)
    took = time.monotonic() - lossy_at
    with stream.cond:
        copied_from = stream.sent + 1  # sent after the line was written: copies on both links
    stream.finish()
    upstream = stream.upstream(pair.echo)
    copies = grew(before, pair.links, "up_in")[other]
    # Until the first missed heartbeat is noticed (~0.2-0.5 s) half of the stream is lost; after
    # that, nearly nothing (a copy stops only after AUTO_REDUNDANCY_HEARTBEATS answers in a row).
    later = range(copied_from, 3 * count + 1)
    loss = 1.0 - len(upstream) / (3 * count)
    later_loss = 1.0 - sum(1 for seq in later if upstream[seq]) / max(1, len(later))
    report("auto: a copy on link %d %.2fs after 50%% loss began on link %d; delivered loss %.1f%% over the "
           "lossy phase (%d datagrams), %.1f%% after the copy began (%d); link %d forwarded %d datagrams" % (
               other, took, lossy, 100 * loss, 3 * count, 100 * later_loss, len(later), other, copies))
    assert len(later) >= count, "the copy began only %.2fs after the loss" % took
    assert copies >= count, "the copies did not go on link %d: it forwarded %d datagrams" % (other, copies)
    assert later_loss < 0.05, "delivered loss %.3f with auto against 50%% on the active link" % later_loss
    assert not [n for n in upstream.values() if n > 1], "a datagram reached the upstream twice"

    # Loss gone: the misses age out (the last AUTO_REDUNDANCY_HEARTBEATS heartbeats all answered)
    # and the copy stops.  At 50 % loss a run of 10 answers (which would already have stopped it)
    # comes about once in 1000 heartbeats: then there is no change left to time.
    heal = line_count(pair.client)
    pair.links[lossy].set(loss_up=0.0)
    healed_at = time.monotonic()
    state = [line for line in lines_from(pair.client, both) if "sending on" in line][-1]
    if state.endswith(sending_on(pair, lossy, other)):
        pair.client.wait_line_ending(sending_on(pair, lossy), heal)
        report("auto: back to link %d alone %.2fs after the loss ended (heartbeat 0.1 s, misses age out "
               "after %d)" % (lossy, time.monotonic() - healed_at, mpudp.AUTO_REDUNDANCY_HEARTBEATS))
    else:
        report("auto: a run of answered heartbeats had already stopped the copy before the loss ended")
    score = fresh_json(pair.score_file, lambda d: d["copies"] == 1, "one copy again")
    state = [line for line in lines_from(pair.client, both) if "sending on" in line][-1]
    assert state.endswith(sending_on(pair, lossy)), state
    assert [link["carrier"] for link in score["links"]] == [i == lossy for i in range(2)], score["links"]
    assert pair.client.count_lines(" switch ") == 0 and pair.client.count_lines(" down after ") == 0
    assert_no_internal_error(pair)


# ============================================================================
# 4. redundancy 1 (the default): data on the active link only
# ============================================================================


@pytest.mark.slow
def test_one_copy_by_default(relay_pair, tmp_path, streams):
    count = 300
    pair = pair_with_files(relay_pair, tmp_path)  # no redundancy key: the default, 1
    score = wait_json(pair.score_file, settled, "both links up and steady")
    active = active_index(score)
    other = 1 - active
    assert score["copies"] == 1
    assert [link["carrier"] for link in score["links"]] == [i == active for i in range(2)], score["links"]
    before = counters_of(pair.links)
    stream = streams(pair.client_address, count, rate=100, size=500)
    stream.finish()
    up, down = grew(before, pair.links, "up_in"), grew(before, pair.links, "down_out")

    report("redundancy 1: %d datagrams; forwarded up / down by the active link %d: %d / %d, by link %d: "
           "%d / %d (heartbeats)" % (count, active, up[active], down[active], other, up[other], down[other]))
    assert exactly_once(stream.replies(), count) == ([], {})
    assert exactly_once(stream.upstream(pair.echo), count) == ([], {})
    assert up[active] >= count and down[active] >= count, (up, down)
    assert up[other] < count / 2 and down[other] < count / 2, (
        "link %d carried data: %d datagrams up, %d down, for %d sent" % (other, up[other], down[other], count))
    client = fresh_json(pair.score_file)
    status = fresh_json(pair.status_file)
    assert client["copies"] == 1 and client["counters"].get("duplicate", 0) == 0, client
    assert status["counters"].get("duplicate", 0) == 0, status["counters"]
    assert [link for link, _addr in status["clients"][0]["return_links"]] == [active], status["clients"]
    assert pair.client.count_lines("sending on") == 0
    assert pair.server.count_lines("go by links") == 0 and pair.server.count_lines("return path links") == 0
    assert_no_internal_error(pair)


# ============================================================================
# 5. The return path with copies: every reply on both links, delivered once
# ============================================================================


@pytest.mark.slow
def test_replies_go_back_on_both_links(relay_pair, tmp_path, streams):
    count = 300
    pair = pair_with_files(relay_pair, tmp_path, redundancy=2)
    wait_json(pair.score_file, lambda d: settled(d) and d["copies"] == 2, "both links up, steady, 2 copies")
    status = wait_json(pair.status_file, lambda d: len(d["clients"][0]["return_links"]) == 2,
                       "replies on two links")
    assert [link for link, _addr in status["clients"][0]["return_links"]] == [0, 1]
    server_line = re.compile(r"client 0: (return path|replies now go by) links 0 \(127\.0\.0\.1:\d+\) "
                             r"\+ 1 \(127\.0\.0\.1:\d+\)$")
    assert [line for line in lines_from(pair.server) if server_line.search(line)], pair.server.output()
    client_before = fresh_json(pair.score_file)["counters"].get("duplicate", 0)
    before = counters_of(pair.links)

    stream = streams(pair.client_address, count, rate=100, size=300)
    stream.finish()
    down = grew(before, pair.links, "down_out")
    assert exactly_once(stream.replies(), count) == ([], {})
    assert exactly_once(stream.upstream(pair.echo), count) == ([], {})
    # Each link brought back every reply (plus the echoes of its heartbeats).
    assert min(down) >= count, "datagrams back per link: %r for %d replies" % (down, count)
    client = fresh_json(pair.score_file)
    dropped = client["counters"].get("duplicate", 0) - client_before
    report("redundancy 2: %d replies, datagrams back per link %r, copies dropped by the client %d" % (
        count, down, dropped))
    # Every reply came twice, one copy was dropped: ~count (a few may be older than the replay
    # window's view of "seen" only if 2048 newer packets came between, which 300 cannot make).
    assert dropped >= count, "the client dropped %d copies of %d replies" % (dropped, count)
    assert client["copies"] == 2 and [link["carrier"] for link in client["links"]] == [True, True]
    assert_no_internal_error(pair)
