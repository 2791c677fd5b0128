"""Aggregation's parts on their own, on a fake clock: the rate estimate (LinkRate), the
scheduler (Spreader) and the reorder buffer (ReorderBuffer); the config rule."""

import io
import random
import struct
import time

import pytest

from conftest import wait_json
from helpers import WAIT_S, Echoes, addr_text, drain
from test_control import bring_up, client_config, make_links, steering_config

import mpudp


# -- LinkRate and rebalance -------------------------------------------------------------------


def saturate(capacities, intervals, ways=None, delays=None, offered=None):
    """Drive rebalance() against links of these capacities (bytes/s) fed `offered` bytes/s in
    all (default: their sum, a flow that fills them), split by the shares: a link given more
    than it carries queues (the more, the longer, up to a full 50 ms buffer) and delivers
    its capacity.  The shares after each interval."""
    ways = ways or [mpudp.LinkRate() for _ in capacities]
    delays = delays or [0.001] * len(capacities)
    history = []
    for _ in range(intervals):
        total = offered if offered is not None else sum(capacities)
        shares = [way.share / sum(w.share for w in ways) for way in ways]
        for way, share, capacity in zip(ways, shares, capacities):
            sent = share * total
            queue = min(0.05, max(0.0, 0.25 * (sent / capacity - 1)))  # a 20% overload fills it
            way.on_interval(int(sent * 0.5), int(min(sent, capacity) * 0.5), 0.0, queue, 0.5)
        mpudp.rebalance(ways, delays)
        history.append([round(way.share, 3) for way in ways])
    return ways, history


@pytest.mark.parametrize("capacities, expected", [((2.5e6, 2.5e6), 0.5), ((6.25e6, 2.5e6), 5 / 7),
                                                  ((1e6, 4e6), 0.2)])
def test_shares_settle_near_the_links_capacities(capacities, expected):
    ways, history = saturate(capacities, 40)
    settled = [h[0] for h in history[20:]]
    assert all(abs(share - expected) <= 0.12 for share in settled), (expected, settled)


def test_shares_follow_a_capacity_that_drops_within_seconds():
    ways, _ = saturate((2.5e6, 2.5e6), 20)
    _, history = saturate((0.8e6, 2.5e6), 12, ways)  # link 0's LTE cell gets crowded
    assert history[-1][0] <= 0.24 + 0.12, history  # 0.8 / 3.3 = 0.24; within 6 s at 0.5 s heartbeats


def overload(capacities, offered, intervals, seed):
    """Drive rebalance() with an unresponsive flow of `offered` bytes/s (a UDP stream) over
    links of these capacities, each with a 50 ms drop-tail buffer, the sent and delivered
    counts off by up to 2% (seeded).  (share of link 0 after each interval, the part of
    what was offered that was delivered in each)."""
    rnd = random.Random(seed)
    ways = [mpudp.LinkRate() for _ in capacities]
    backlog = [0.0] * len(capacities)  # bytes queued in each link's buffer
    shares, delivered_parts = [], []
    for _ in range(intervals):
        split = [way.share / sum(w.share for w in ways) for way in ways]
        delivered_total = 0.0
        for i, (way, part, capacity) in enumerate(zip(ways, split, capacities)):
            sent = part * offered * 0.5 * rnd.uniform(0.98, 1.02)
            carried = min(capacity * 0.5, backlog[i] + sent)
            backlog[i] += sent - carried
            lost = max(0.0, backlog[i] - 0.05 * capacity)
            backlog[i] -= lost
            delivered_total += carried
            way.on_interval(int(sent), int(carried * rnd.uniform(0.98, 1.02)), lost / sent if sent else 0.0,
                            backlog[i] / capacity, 0.5)
        mpudp.rebalance(ways, [0.001] * len(capacities))
        shares.append(ways[0].share / sum(w.share for w in ways))
        delivered_parts.append(delivered_total / (offered * 0.5))
    return shares, delivered_parts


@pytest.mark.parametrize("capacities, load", [((2.25e6, 2.25e6), 1.004), ((6.25e6, 2.5e6), 1.0),
                                              ((2.25e6, 2.25e6), 1.2)])
@pytest.mark.parametrize("seed", range(3))
def test_an_overload_of_every_link_is_split_by_capacity_and_loses_only_the_excess(capacities, load, seed):
    """A UDP stream above what the links carry together: shares that swing make one link
    drop while the other idles; they must settle where each link is sent what it carries."""
    offered = load * sum(capacities)
    shares, delivered = overload(capacities, offered, 40, seed)
    settled = sorted(shares[10:])
    assert abs(settled[len(settled) // 2] - capacities[0] / sum(capacities)) <= 0.03, shares
    assert all(abs(share - capacities[0] / sum(capacities)) <= 0.1 for share in settled), shares
    at_most = min(1.0, 1.0 / load)  # what the links can carry of it
    assert sum(delivered[10:]) / len(delivered[10:]) >= at_most - 0.02, delivered


def test_a_slower_link_gives_its_share_to_the_faster_while_neither_is_full():
    ways, history = saturate((2.5e6, 2.5e6), 30, delays=[0.001, 0.016], offered=1e6)
    assert history[-1][1] <= 0.05, history[-1]  # 30 ms more RTT and room on the fast link: hardly used
    assert history[-1][1] >= mpudp.AGG_MIN_SHARE / 2  # but still measured
    # When the fast link cannot carry it all, the slow one takes what it cannot.
    _, history = saturate((2.5e6, 2.5e6), 30, ways, delays=[0.001, 0.016], offered=4e6)
    assert 0.2 <= history[-1][1] <= 0.55, history[-1]


def test_a_slower_link_keeps_its_share_while_the_faster_is_known_to_be_too_small():
    """A flow that fills two equal links, one 30 ms slower, then backs off to 70% of what
    they carry together (TCP after a loss): the slow link keeps its share, for the fast one
    was seen full at less than that; had it given the share up, the flow would have to
    fill the fast link again to get it back.  Well below the fast link's rate, it gives
    the share up again."""
    delays = [0.001, 0.016]
    ways, history = saturate((2.5e6, 2.5e6), 30, delays=delays, offered=5e6)
    filled = history[-1][1]
    assert filled >= 0.4, history[-1]
    assert [way.capacity for way in ways] == [2.5e6, 2.5e6]  # each was seen full
    _, history = saturate((2.5e6, 2.5e6), 10, ways, delays=delays, offered=3.5e6)
    assert min(h[1] for h in history) >= filled - 0.02, history
    _, history = saturate((2.5e6, 2.5e6), 30, ways, delays=delays, offered=1e6)
    assert history[-1][1] <= 0.05, history[-1]


def test_a_link_seen_full_is_taken_to_carry_what_it_delivered_then_and_more_once_it_does():
    way = mpudp.LinkRate()
    way.on_interval(10 ** 6, 10 ** 6, 0.0, 0.0, 0.5)
    way.note_capacity(False)
    assert way.capacity is None  # never full: nothing known
    way.on_interval(10 ** 6, 9 * 10 ** 5, 0.1, 0.02, 0.5)
    way.note_capacity(True)
    assert way.capacity == 1.8e6
    way.on_interval(10 ** 6, 8 * 10 ** 5, 0.0, 0.0, 0.5)
    way.note_capacity(False)
    assert way.capacity == 1.8e6  # delivering less without being full says nothing
    way.on_interval(1.5 * 10 ** 6, 1.5 * 10 ** 6, 0.0, 0.0, 0.5)
    way.note_capacity(False)
    assert way.capacity == 3e6
    way.on_interval(10 ** 6, 5 * 10 ** 5, 0.1, 0.02, 0.5)
    way.note_capacity(True)
    assert way.capacity == 1e6  # full at less: the link got slower (an LTE cell)


def test_nothing_moves_while_the_links_carry_nothing_or_queue_alike():
    ways = [mpudp.LinkRate(), mpudp.LinkRate()]
    ways[0].share = 0.7
    ways[1].share = 0.3
    ways[0].on_interval(100, 100, 0.0, 0.2, 0.5)  # a queue on an idle link: another's traffic, or noise
    mpudp.rebalance(ways, [0.001, 0.001])
    assert [round(w.share, 3) for w in ways] == [0.7, 0.3]
    for way in ways:
        way.on_interval(10 ** 6, 10 ** 6, 0.0, 0.03, 0.5)  # both full alike
    mpudp.rebalance(ways, [0.001, 0.001])
    assert [round(w.share, 3) for w in ways] == [0.7, 0.3]
    # The Spreader's rates: the shares of what the carriers delivered, with headroom.
    assert sum(w.rate for w in ways) == pytest.approx(mpudp.AGG_HEADROOM * 4 * 10 ** 6)
    assert ways[0].rate == pytest.approx(0.7 * sum(w.rate for w in ways))


def test_a_link_that_loses_data_gives_up_share_even_without_a_queue():
    ways = [mpudp.LinkRate(), mpudp.LinkRate()]
    ways[0].on_interval(10 ** 6, 9 * 10 ** 5, 0.1, 0.0, 0.5)
    ways[1].on_interval(10 ** 6, 10 ** 6, 0.0, 0.0, 0.5)
    mpudp.rebalance(ways, [0.001, 0.001])
    assert ways[0].share < 0.5 < ways[1].share


@pytest.mark.parametrize("client_offset_ms", [0, 123456789, (1 << 32) - 3, (1 << 31) + 1])
def test_the_server_tells_a_queue_towards_it_from_the_heartbeats_one_way_times(client_offset_ms):
    """The clocks differ by anything (the client's wraps at 2^32 ms): only the rise of the
    one-way time over its least counts."""
    state = mpudp.PeerLink()
    reports = []
    for i, one_way in enumerate([0.005, 0.006, 0.005, 0.045, 0.025, 0.005]):
        sent = 100.0 + i * 0.5  # the client's clock, in s
        client_ms = (int(sent * 1000) + client_offset_ms) & mpudp.COUNT_MASK
        reports.append(state.up_queue_ms(client_ms, 5000.0 + sent + one_way))
    assert reports == [0, 1, 0, 40, 20, 0]


# -- Spreader ------------------------------------------------------------------------------


def spread(links, count, size=1200, pps=1000.0, start=0.0):
    spreader = mpudp.Spreader()
    picks = []
    for i in range(count):
        picks.append(spreader.pick(links, size, start + i / pps))
    return picks


def test_equal_links_share_equally():
    links = [(0, 2.5e6, 0.005), (1, 2.5e6, 0.005)]
    picks = spread(links, 4000, pps=4000.0)  # 4.8 MB/s offered, 5 MB/s of links
    assert abs(picks.count(0) - picks.count(1)) <= 40


def test_unequal_links_share_by_their_rates():
    links = [(0, 5e6, 0.005), (1, 2e6, 0.005)]
    picks = spread(links, 7000, pps=5800.0)  # about what both carry together
    share = picks.count(0) / len(picks)
    assert 0.66 <= share <= 0.76, share  # 5:2 is 0.71


def test_a_slower_link_takes_only_what_the_faster_cannot_deliver_sooner():
    links = [(0, 2.5e6, 0.002), (1, 2.5e6, 0.017)]  # 30 ms more round trip on link 1
    light = spread(links, 1000, pps=500.0)  # 0.6 MB/s: link 0 alone delivers each sooner
    assert light.count(1) == 0
    heavy = spread(links, 6000, pps=4000.0)  # 4.8 MB/s: link 0's backlog passes 15 ms
    assert 0.3 <= heavy.count(1) / len(heavy) <= 0.5


def test_an_overload_stays_split_by_rate_through_rate_changes():
    """More than the rates say the links carry (an unresponsive UDP stream at 1.8 times a
    link): every half second both links get their share, even when a rate changes, and
    after it ends the queues are not stale."""
    spreader = mpudp.Spreader()
    rates = [2.5e6, 2.5e6]
    now, windows = 0.0, []
    for window in range(20):
        if window == 10:
            rates = [1.8e6, 2.5e6]  # a share moved, as rebalance() does
        picks = []
        for _ in range(1875):  # 4.5 MB/s of 1200-byte datagrams for 0.5 s
            picks.append(spreader.pick([(0, rates[0], 0.001), (1, rates[1], 0.001)], 1200, now))
            now += 0.5 / 1875
        windows.append(picks.count(0) / len(picks))
    expected = [0.5] * 10 + [1.8 / 4.3] * 10
    assert all(abs(share - want) <= 0.06 for share, want in zip(windows, expected)), windows
    # Idle for a second: both queues are empty again, ties go to the first link.
    assert spreader.pick([(0, 2.5e6, 0.001), (1, 2.5e6, 0.001)], 1200, now + 1.0 + mpudp.SPREAD_AHEAD_S) == 0


# -- ReorderBuffer -------------------------------------------------------------------------


def feed(buffer, arrivals):
    """arrivals: (seq, link, time); the items in the order they were released."""
    buffer.carriers = tuple(sorted(set(link for _seq, link, _at in arrivals)))
    out = []
    for seq, link, now in arrivals:
        buffer.arrive(seq, link, ("s", seq), now, out)
    return [item[1] for item in out]


def test_the_servers_spread_view_follows_the_return_path_at_once_and_heartbeats_estimates():
    """The server does not rebuild the Spreader's view of the links in every drain: a
    return path that moves (a new `links`) is used at once, new rates once a heartbeat
    says so (estimates_changed)."""
    peer = mpudp.Peer(1, bytes(32), None)
    first, rebound = ("10.0.0.1", 4000), ("10.0.0.9", 5000)
    peer.return_path.links = ((0, first), (1, ("10.0.1.1", 4001)))
    peer.link(0).rate, peer.link(1).rate = 1e6, 2e6
    choices, states = peer.spread_links()
    assert [(pair, rate) for pair, rate, _delay in choices] == [((0, first), 1e6), ((1, ("10.0.1.1", 4001)), 2e6)]
    assert states == {0: peer.link(0), 1: peer.link(1)}
    peer.return_path.links = ((0, rebound), (1, ("10.0.1.1", 4001)))  # link 0's NAT rebound
    assert peer.spread_links()[0][0][0] == (0, rebound)
    peer.link(1).rate = 3e6
    peer.estimates_changed()
    assert peer.spread_links()[0][1][1] == 3e6


def test_packets_in_order_pass_straight_through():
    buffer = mpudp.ReorderBuffer(1)
    assert feed(buffer, [(s, s % 2, s * 0.001) for s in range(1, 50)]) == list(range(1, 50))
    assert not buffer.held


def test_early_packets_wait_for_the_slower_link_and_come_out_in_order():
    buffer = mpudp.ReorderBuffer(1)
    # Odd numbers on a link 15 ms slower: each even one is early.
    arrivals = sorted([(s, s % 2, s * 0.001 + (0.015 if s % 2 else 0.0)) for s in range(1, 200)],
                      key=lambda a: a[2])
    assert feed(buffer, arrivals) == list(range(1, 200))
    assert buffer.skipped == 0 and buffer.released_late == 0


def test_a_lost_packet_is_not_waited_for_once_every_link_is_past_it():
    buffer = mpudp.ReorderBuffer(1)
    buffer.hold_s = 10.0  # the timer plays no part here
    arrivals = [(1, 0, 0.0), (3, 0, 0.001), (4, 1, 0.002), (5, 0, 0.003)]  # 2 lost on link 1
    assert feed(buffer, arrivals) == [1, 3, 4, 5]
    assert buffer.skipped == 1


def test_with_one_link_idle_a_lost_packet_is_given_up_after_the_hold():
    buffer = mpudp.ReorderBuffer(1)
    buffer.hold_s = 0.02
    buffer.carriers = (0, 1)
    out = []
    buffer.arrive(1, 0, ("s", 1), 0.0, out)
    buffer.arrive(2, 1, ("s", 2), 0.001, out)  # link 1 carried 2, and nothing after
    buffer.arrive(4, 0, ("s", 4), 0.002, out)  # 3 went on link 1 and was lost
    assert [item[1] for item in out] == [1, 2]
    assert buffer.deadline() == pytest.approx(0.022)
    buffer.expire(0.01, out)
    assert len(out) == 2
    buffer.expire(0.023, out)
    assert [item[1] for item in out] == [1, 2, 4]
    buffer.arrive(3, 1, ("s", 3), 0.03, out)  # it was only late: delivered at once
    assert [item[1] for item in out] == [1, 2, 4, 3] and buffer.released_late == 1


def test_control_packets_take_their_place_and_are_not_delivered():
    buffer = mpudp.ReorderBuffer(1)
    buffer.carriers = (0,)
    out = []
    buffer.arrive(1, 0, ("s", 1), 0.0, out)
    buffer.arrive(3, 0, ("s", 3), 0.001, out)
    # 2 was a heartbeat on link 1, which carries no data: 3 did not wait for it, and
    # when it comes it delivers nothing.
    assert [item[1] for item in out] == [1, 3] and not buffer.held and buffer.skipped == 1
    buffer.arrive(2, 1, None, 0.002, out)
    buffer.arrive(5, 1, None, 0.003, out)  # a heartbeat on link 1 again, in order this time
    buffer.arrive(4, 0, ("s", 4), 0.004, out)
    buffer.arrive(6, 0, ("s", 6), 0.005, out)
    assert [item[1] for item in out] == [1, 3, 4, 6] and buffer.released_late == 0


def test_seeded_interleavings_deliver_everything_once_and_in_order_when_nothing_is_lost():
    rng = random.Random(17)
    for _ in range(200):
        delays = [rng.uniform(0, 0.03) for _ in range(3)]
        arrivals = []
        for seq in range(1, 300):
            link = rng.randrange(3)
            arrivals.append((seq, link, seq * 0.0005 + delays[link] + rng.uniform(0, 0.0004)))
        # Each link is FIFO: a packet never passes an earlier one on its own link.
        last = {}
        fifo = []
        for seq, link, at in arrivals:
            at = max(at, last.get(link, 0.0))
            last[link] = at
            fifo.append((seq, link, at))
        buffer = mpudp.ReorderBuffer(1)
        buffer.hold_s = 0.05
        fifo.sort(key=lambda a: a[2])
        assert feed(buffer, fifo) == list(range(1, 300))


# -- Steering with aggregate ----------------------------------------------------------------


def test_aggregate_carries_on_every_steady_link_and_a_link_back_only_once_steady():
    links = make_links(3)
    steering = mpudp.Steering(steering_config(aggregate=True), mpudp.Log(stream=io.StringIO()))
    now = 1000.0
    for link in links:
        bring_up(link, now)
    steering.first_choice(links, now)
    route = steering.evaluate(links, now)
    assert set(route.carriers) == set(links) and route.spread
    assert route.data_flags & mpudp.COPIES_MASK == 2 << mpudp.COPIES_SHIFT  # the server learns three carry
    links[2].health.force_down(now)  # a link dies: it leaves at once
    assert set(steering.evaluate(links, now).carriers) == {links[0], links[1]}
    links[2].health.on_sent(99, now + 1)
    links[2].health.on_echo(99, 1, now + 1.01)  # it answers again, once: up, not steady
    assert links[2].health.up and not links[2].health.steady
    assert links[2] not in steering.evaluate(links, now + 1.01).carriers
    for seq in range(100, 104):
        links[2].health.on_sent(seq, now + seq - 98)
        links[2].health.on_echo(seq, 1, now + seq - 98 + 0.01)
    assert links[2].health.steady and links[2] in steering.evaluate(links, now + 6).carriers


# -- config --------------------------------------------------------------------------------


def test_aggregate_is_off_by_default_and_a_boolean():
    assert mpudp.parse_config(client_config(links=2)).section.aggregate is False
    assert mpudp.parse_config(client_config(links=2, aggregate=True)).section.aggregate is True
    with pytest.raises(mpudp.ConfigError, match=r"client.aggregate: must be true or false, not a string"):
        mpudp.parse_config(client_config(links=2, aggregate="yes"))


@pytest.mark.parametrize("redundancy", [2, "auto"])
def test_aggregate_with_redundancy_is_one_line_naming_both(redundancy):
    with pytest.raises(mpudp.ConfigError) as caught:
        mpudp.parse_config(client_config(links=2, aggregate=True, redundancy=redundancy))
    assert str(caught.value).count("\n") == 0
    assert "client.aggregate: true cannot go with redundancy" in str(caught.value)


# -- in process: a client and a server on real sockets -----------------------------------------


def test_aggregate_spreads_both_ways_and_delivers_in_order_in_process(in_process, monkeypatch):
    """Two links, one 10 ms slower each way (a link emulator): bursts of numbered datagrams
    go over both links both ways, and the upstream and the application each get every
    one, in order.  The hold is made long (nothing is lost on loopback), so that a loaded
    machine delaying the emulator's thread cannot make a packet late: the hold's length
    is the unit tests' business."""
    monkeypatch.setattr(mpudp, "REORDER_HOLD_FLOOR_S", WAIT_S / 3)
    monkeypatch.setattr(mpudp, "REORDER_HOLD_CAP_S", WAIT_S / 3)
    harness = in_process()
    server = harness.add_server()
    fast = harness.add_emulator(harness.address_of(server))
    slow = harness.add_emulator(harness.address_of(server))
    slow.set(delay_s=0.01)
    client = harness.add_client([addr_text(*fast.address), addr_text(*slow.address)],
                                heartbeat_interval_sec=0.1, aggregate=True)
    assert harness.run_until(lambda: client.epoch is not None and all(link.health.steady for link in client.links)
                             and len(client.data.route.carriers) == 2, WAIT_S), harness.log_text()[-2000:]
    assert client.data.route.spread
    # The server learns from the heartbeats that the client aggregates.
    assert harness.run_until(lambda: harness.peer.spreader is not None and len(harness.peer.return_path.links) == 2,
                             WAIT_S), harness.log_text()[-2000:]
    sent, echoed = 0, []
    deadline = time.monotonic() + WAIT_S
    while len(echoed) < 2000 and time.monotonic() < deadline:
        while sent < 2000 and sent - len(echoed) < 64:  # 64 in flight: the links' estimates fill
            harness.app.sendto(struct.pack("!I", sent) + b"x" * 1000, harness.client_addr)
            sent += 1
        harness.pump(0.005)
        echoed.extend(struct.unpack_from("!I", data)[0] for data, _ in drain(harness.app))
    upstream = [struct.unpack_from("!I", data)[0] for data in harness.upstream_payloads()]
    assert upstream == list(range(2000)), "the upstream got them out of order or not all"
    assert echoed == list(range(2000)), "the application got them out of order or not all"
    assert all(link.data_sent > 100 for link in client.links), [link.data_sent for link in client.links]
    assert all(harness.peer.link(i).data_sent > 100 for i in (0, 1)), harness.log_text()[-2000:]
    assert "client 0 aggregates" in harness.log_text()
    # The metrics say what the status says: each link's estimates both ways, its path MTU.
    status = {link["index"]: link for link in client.status()["links"]}
    metrics = {name: dict((labels["link"], value) for labels, value in samples)
               for name, _kind, _help, samples in client.metrics() if name.startswith("mpudp_link_")}
    for way in ("up", "down"):
        rates = metrics["mpudp_link_rate_%s_bytes_per_second" % way]
        assert sorted(rates) == [0, 1]
        for index, rate in rates.items():
            assert rate * 8 / 1000 == pytest.approx(status[index]["rate_%s_kbps" % way], abs=0.1)
            assert rate != mpudp.AGG_INITIAL_RATE, (way, rates)  # estimated since, from what the links carried
    for index, mtu in metrics["mpudp_link_path_mtu_bytes"].items():
        assert (mtu == status[index]["path_mtu"]) if status[index]["path_mtu"] else mtu != mtu  # NaN: not known
    # And the debug log's table (SIGUSR1 and the demo print it too): shares and estimates both ways.
    table = client.link_table()
    assert "share up/down" in table[0] and "est. Mbit/s up/down" in table[0], table[0]
    for index in (0, 1):
        shares = "%.0f%%/%.0f%%" % (status[index]["share_up"] * 100, status[index]["share_down"] * 100)
        assert shares in table[1 + index], (shares, table)


def test_the_client_spreads_over_the_route_it_has_now_with_the_estimates_of_the_last_evaluation(in_process):
    """The client makes the Spreader's view of its carriers once per evaluation, not per drain:
    a drain after the route changed spreads over the new carriers only, and an evaluation
    brings the rates it has just estimated."""
    harness = in_process()
    server = harness.add_server()
    client = harness.add_client([addr_text(*harness.address_of(server))] * 3, heartbeat_interval_sec=0.1,
                                aggregate=True)
    assert harness.run_until(lambda: client.epoch is not None and len(client.data.route.carriers) == 3, WAIT_S), \
        harness.log_text()[-2000:]
    data = client.data
    links = client.links
    for link in links:
        link.rate_up.rate = 1.0  # a sentinel that no evaluation gives
    data.refresh_spread()  # the view holds the sentinel now
    client.evaluate()
    assert all(link.rate_up.rate != 1.0 for link in links)
    assert [(link, rate) for link, rate, _delay in data.spread_choices] == \
        [(link, link.rate_up.rate) for link in data.route.carriers]
    data.route = mpudp.Route((links[1], links[2]), spread=True)  # as control publishes one: link 0 left out
    before = [link.data_sent for link in links]
    for i in range(200):
        harness.app.sendto(b"%d" % i, harness.client_addr)
    harness.run_until(lambda: sum(link.data_sent for link in links) - sum(before) >= 200, WAIT_S)
    sent = [link.data_sent - b for link, b in zip(links, before)]
    assert sent[0] == 0 and sent[1] + sent[2] == 200, sent


def test_an_early_packet_waits_for_its_hold_then_goes_to_the_application(rig):
    """The data path's report that packets wait arms a timer for the end of their hold;
    when it fires, they go to the application (the packet before them is given up)."""
    harness = rig(client={"aggregate": True})
    harness.round_trip(b"a session for the application")
    client, reorder = harness.client, harness.client.data.reorder
    session_id = next(iter(client.data.sessions_by_id))
    out = []
    reorder.arrive(reorder.next + 50, 1, (session_id, b"early"), harness.clock.now, out)
    assert out == [] and reorder.held
    client.on_reorder_waiting()  # what the drain asks for, once it is over
    assert client._reorder_timer.when == reorder.deadline() == harness.clock.now + reorder.hold_s
    skipped = reorder.skipped
    harness.run(reorder.hold_s / 2, step=reorder.hold_s / 10)
    assert b"early" not in [data for data, _ in drain(harness.app)]
    harness.run(reorder.hold_s, step=reorder.hold_s / 10)
    assert b"early" in [data for data, _ in drain(harness.app)]
    assert reorder.skipped > skipped and not reorder.held and client._reorder_timer is None


def test_only_an_aggregating_client_has_rate_metrics(rig):
    """The rate gauges and the table's share columns belong to aggregate mode; without it
    they are not there at all."""
    harness = rig()
    names = {name for name, _kind, _help, _samples in harness.client.metrics()}
    assert "mpudp_link_path_mtu_bytes" in names
    assert not any(name.startswith("mpudp_link_rate_") for name in names), names
    assert "share" not in harness.client.link_table()[0]  # nor table columns


# -- real processes ---------------------------------------------------------------------------


@pytest.mark.slow
def test_aggregate_spreads_a_stream_both_ways_in_order_and_survives_a_dead_link(relay_pair, tmp_path):
    score = str(tmp_path / "score.json")
    pair = relay_pair(links=2, client={"heartbeat_interval_sec": 0.2, "aggregate": True, "score_file": score})
    wait_json(score, lambda d: sorted(d["carriers"]) == [0, 1], "both links carrying")
    before = [link["tx_bytes"] for link in wait_json(score, lambda d: True, "the status")["links"]]
    stream = Echoes(pair, 600, 400)
    try:
        time.sleep(3.0)  # three seconds of stream on both links (pacing)
        status = wait_json(score, lambda d: True, "the status")
        spread_up = [link["tx_bytes"] - was for link, was in zip(status["links"], before)]
        assert min(spread_up) > 0.1 * sum(spread_up), spread_up  # both links carry the stream up
        assert all(link["share_down"] > 0.1 for link in status["links"]), status["links"]
        # In order: the figure is 99% (a loaded machine may delay one link's
        # emulator thread past the hold; nothing else may reorder).
        echoes, highest, behind = [seq for _at, seq in list(stream.arrivals)], -1, 0
        for seq in echoes:
            behind += seq < highest
            highest = max(highest, seq)
        assert behind <= 0.01 * len(echoes), "%d of %d echoes out of order" % (behind, len(echoes))
        # A link dies: the stream goes on over the other within 2 s, nothing twice.
        pair.links[0].set(blackhole=True)
        died_at = time.monotonic()
        sent_then = stream.sent
        deadline = died_at + WAIT_S
        while time.monotonic() < deadline and not any(seq > sent_then + 40 for _at, seq in stream.arrivals[-5:]):
            time.sleep(0.05)  # polling the receiving thread's list
        resumed = [at for at, seq in list(stream.arrivals) if seq > sent_then + 40]
        assert resumed and resumed[0] - died_at < 2.0, "no echo of a datagram sent after the link died"
        assert len(stream.arrivals) == len(stream.received), "a datagram was delivered twice"
        print("aggregate: the stream came back %.2f s after link 0 died" % (resumed[0] - died_at))
    finally:
        stream.close()
