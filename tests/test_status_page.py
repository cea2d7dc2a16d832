"""The status page (``GET /api/status``) in a real headless Chromium, against the simulator.

The simulator serves the app's own HTTP functions (``simulator/http.py``); simulated instances
commit a generated workload; then the test forces a takeover (a leader holding the lease, its
lease broken, another instance claiming the next epoch) and checks that the page follows it and
that every figure it shows equals what the read API answers and what storage holds.

Chromium is Debian's ``chromium`` package (``./dev test`` installs it), driven by Playwright's
Python package; ``CHROMIUM`` overrides the path. Without it the test fails: it never skips.
Set ``STATUS_PAGE_SCREENSHOT=/tmp/page.png`` to save what the page showed (phone-sized).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobLeaseClient
from playwright.sync_api import Browser, Page, ViewportSize, expect, sync_playwright

from bench.probe import CallCounter
from shared import wiring as runtime
from shared.config.names import lease_blob_name
from shared.config.settings import load_config
from shared.domain.sharding import ShardMap
from shared.election.elector import HeldLease
from shared.leadership.instance import LedgerApp
from shared.leadership.term import LeaderTerm
from shared.storage.clients import (
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    azurite_connection_string,
    clients_from_connection_string,
)
from shared.web import status as status_data
from simulator.azurite import Azurite, free_port
from simulator.cluster import Cluster
from simulator.http import serve
from simulator.workload import generate
from tests.helpers import (
    ManualClock,
    Namespace,
    deposit,
    lease_blob,
    record,
    send,
    status,
    transfer,
    wait_until,
)

CHROMIUM = (os.environ.get("CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser") or "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
PHONE: ViewportSize = {"width": 390, "height": 844}
SMALL_PHONE: ViewportSize = {"width": 360, "height": 740}
SHARDS16 = 16
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is not at {CHROMIUM}: run ./dev test (it installs Debian's "
                    "chromium package as root) or `apt-get install chromium`, or set CHROMIUM "
                    "to its path. The status page is only tested in a real browser.")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield instance
        instance.close()


def _serve(ns: Namespace, monkeypatch: pytest.MonkeyPatch, **settings: str) -> Iterator[str]:
    for name, value in ns.env(LEASE_SECONDS="15", **settings).items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    server, base_url = serve()
    yield base_url
    server.shutdown()
    runtime.reset()


@pytest.fixture
def served(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The app's HTTP functions served by the simulator on this test's storage names."""
    yield from _serve(ns, monkeypatch)


@pytest.fixture
def served16(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The same, for a ledger of 16 shards."""
    yield from _serve(ns, monkeypatch, LEDGER_SHARDS=str(SHARDS16))


def get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def open_page(browser: Browser, base_url: str) -> Page:
    page = browser.new_page(viewport=PHONE, device_scale_factor=2)
    page.goto(f"{base_url}/api/status?refresh=1")
    return page


def text(page: Page, element_id: str) -> str:
    return str(page.locator(f"#{element_id}").inner_text()).strip()


def page_outcomes(page: Page) -> dict[str, int]:
    rows = page.locator("#outcomes tr").all()
    return {str(row.get_attribute("data-status")): int(row.locator("td").nth(1).inner_text())
            for row in rows}


def page_leaders(page: Page) -> dict[int, tuple[str, int]]:
    found = {}
    for row in page.locator("#leaders tr[data-epoch]").all():
        cells = row.locator("td")
        found[int(str(row.get_attribute("data-epoch")))] = (cells.nth(1).inner_text(),
                                                            int(cells.nth(2).inner_text()))
    return found


def lead(app: LedgerApp) -> tuple[HeldLease, LeaderTerm]:
    """Take the lease and claim the next epoch, as an instance's election does; keep both."""
    held = app.elector.try_acquire()
    assert held is not None, "the lease should be free for this instance"
    return held, LeaderTerm.begin(app, held)


def test_the_page_follows_a_takeover_and_shows_what_the_read_api_and_storage_hold(
        browser: Browser, served: str, ns: Namespace) -> None:
    app = ns.app(LEASE_SECONDS="15")
    work = generate(accounts=5, transfers=30, malformed=2, seed=11)
    queue = app.queue()
    for message in work.messages:
        queue.send(message)
    poison = app.queue(app.config.poison_queue)
    for body in ("gave up on this one", "and this one"):
        poison.send(body)
    cluster = Cluster(ns.env(LEASE_SECONDS="15"), instances=2, threads=2, sweep_seconds=2)
    cluster.start()
    try:
        wait_until(lambda: len(app.ledger.list_outcomes()) == work.requests, 180,
                   "the simulated instances decided every request")
        wait_until(lambda: len(app.parking.list()) == work.malformed, 60, "malformed parked")
    finally:
        cluster.stop()
    # A duplicate delivered after its request was decided may wait as a late row until a leader
    # that knows the request settles it: count what is left, so the figures below are exact.
    left = app.completions.scan_rows(fallback_now=app.clock.now()).steps
    late_rows = sum(len(steps) for steps in left.values())
    page = open_page(browser, served)
    try:
        expect(page.locator("#banner")).to_contain_text("Live", timeout=WAIT_MS)
        first_epoch = int(get_json(f"{served}/api/leader")[1]["epoch"])
        assert first_epoch >= 1
        expect(page.locator("#epoch")).to_have_text(str(first_epoch), timeout=WAIT_MS)
        expect(page.locator("#parked")).to_have_text(str(work.malformed))
        expect(page.locator("#parked-kinds")).to_contain_text(f"malformed {work.malformed}")
        expect(page.locator("#poisoned")).to_have_text("2")
        stored = Counter(row.outcome.status.value for row in app.ledger.list_outcomes())
        assert page_outcomes(page) == {**stored, "total": work.requests}
        assert int(page.locator("#chart").get_attribute("data-total") or -1) == stored[
            "committed"], "every commit of the last minutes is in the chart"

        # Forced takeover: A leads (lease held, epoch claimed, a deposit committed) ...
        a = ns.app(instance_id="status-a", LEASE_SECONDS="15")
        held_a, term_a = lead(a)
        record(a, *deposit("after-a", "acct-000", "7.00"))
        term_a.commit_ready(a.clock.monotonic() + 30)
        assert status(a, "after-a") == "committed"
        expect(page.locator("#holder")).to_have_text("status-a", timeout=WAIT_MS)
        expect(page.locator("#epoch")).to_have_text(str(first_epoch + 1), timeout=WAIT_MS)
        expect(page.locator("#lease-state")).to_have_text("leased")
        expect(page.locator("#lease-left")).to_contain_text("at least")

        # ... then its lease is broken and B claims the next epoch while A still believes.
        BlobLeaseClient(lease_blob(a)).break_lease(lease_break_period=0)
        b = ns.app(instance_id="status-b", LEASE_SECONDS="15")
        held_b, term_b = lead(b)
        record(b, *transfer("after-b", "acct-000", "acct-001", "2.00"))
        record(b, transfer("pending-c", "acct-001", "acct-002", "1.00")[0])  # one leg of two
        term_b.commit_ready(b.clock.monotonic() + 30)
        assert status(b, "after-b") == "committed"
        expect(page.locator("#holder")).to_have_text("status-b", timeout=WAIT_MS)
        expect(page.locator("#epoch")).to_have_text(str(first_epoch + 2), timeout=WAIT_MS)
        expect(page.locator("#pending")).to_have_text(str(late_rows + 1), timeout=WAIT_MS)
        expect(page.locator("#oldest-age")).not_to_have_text("none waiting")
        # One shard: its row shows the takeover, epoch first + 1 -> first + 2.
        expect(page.locator("#shards tr")).to_have_count(1)
        expect(page.locator('#shards tr[data-shard="0"] .takeover')).to_contain_text(
            f"epoch {first_epoch + 1} -> {first_epoch + 2}", timeout=WAIT_MS)
        expect(page.locator('#shards tr[data-shard="0"] td').nth(3)).to_have_text(
            str(late_rows + 1))
        leaders = page_leaders(page)
        assert leaders[first_epoch + 2] == ("status-b", 1)
        assert leaders[first_epoch + 1] == ("status-a", 1)
        assert first_epoch in leaders

        # Every figure on the page is what the read API answers.
        _, leader = get_json(f"{served}/api/leader")
        code, metrics = get_json(f"{served}/api/metrics")
        assert code == 200
        assert leader["epoch"] == metrics["leader"]["epoch"] == first_epoch + 2
        assert leader["holder"] == metrics["leader"]["holder"] == term_b.fence.holder
        assert leader["pendingCompletions"] == metrics["pending"]["completions"] == late_rows + 1
        stored = Counter(row.outcome.status for row in b.ledger.list_outcomes())
        assert metrics["outcomes"]["byStatus"] == dict(stored)
        expect(page.locator("#outcomes tr[data-status=total] td").nth(1)).to_have_text(
            str(work.requests + 2), timeout=WAIT_MS)
        assert page_outcomes(page) == {**metrics["outcomes"]["byStatus"],
                                       "total": metrics["outcomes"]["total"]}
        assert text(page, "parked") == str(metrics["parked"]) == str(work.malformed)
        assert text(page, "poisoned") == str(metrics["poisoned"]) == "2"
        assert text(page, "pending-requests") == str(metrics["pending"]["requests"]) == str(
            len(left) + 1)
        assert float(text(page, "rate")) == metrics["throughput"]["committedPerSecondLastMinute"]

        # Readable on a phone: nothing wider than the screen.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        if target := os.environ.get("STATUS_PAGE_SCREENSHOT"):
            page.screenshot(path=target, full_page=True)
        held_a.release()  # lost already: a no-op that must not raise
        held_b.release()
    finally:
        page.close()


def test_sixteen_shards_fit_a_small_phone_and_a_takeover_shows_on_its_shard_only(
        browser: Browser, served16: str, ns: Namespace) -> None:
    shard_map = ShardMap(SHARDS16)
    names = (f"acct-{i}" for i in itertools.count())
    accounts = [next(n for n in names if shard_map.account_shard(n) == k) for k in range(SHARDS16)]
    app = ns.app(instance_id="status-a", LEDGER_SHARDS=str(SHARDS16), LEASE_SECONDS="15")
    send(app, *(body for k, account in enumerate(accounts)
                for body in deposit(f"d{k}", account, "5.00")))
    taken = 5
    page = browser.new_page(viewport=SMALL_PHONE, device_scale_factor=2)
    try:
        page.goto(f"{served16}/api/status?refresh=1")
        expect(page.locator("#banner")).to_contain_text("Live", timeout=WAIT_MS)
        expect(page.locator("#shards tr")).to_have_count(SHARDS16)
        assert [row.get_attribute("data-shard") for row in page.locator("#shards tr").all()] \
            == [str(k) for k in range(SHARDS16)]
        expect(page.locator("#shards .takeover")).to_have_count(0)
        expect(page.locator("#h-leader")).to_have_text("Leader (shard 0)")

        # A leads shard 5 (a deposit committed), its lease is broken, B claims the next epoch.
        a = app.on(taken)
        held_a, term_a = lead(a)
        record(a, *deposit("after-a", accounts[taken], "1.00"))
        term_a.commit_ready(a.clock.monotonic() + 30)
        BlobLeaseClient(a.clients.blob.get_blob_client(
            a.config.lease_container, lease_blob_name(a.config.lease_blob, taken))).break_lease(
            lease_break_period=0)
        b = ns.app(instance_id="status-b", LEDGER_SHARDS=str(SHARDS16),
                   LEASE_SECONDS="15").on(taken)
        held_b, term_b = lead(b)
        record(b, *deposit("after-b", accounts[taken], "2.00"))
        term_b.commit_ready(b.clock.monotonic() + 30)
        row = page.locator(f'#shards tr[data-shard="{taken}"]')
        expect(row.locator(".takeover")).to_contain_text(
            f"epoch {term_a.fence.epoch} -> {term_b.fence.epoch}", timeout=WAIT_MS)
        expect(row.locator("td.holder")).to_contain_text("status-b")
        expect(page.locator("#shards .takeover")).to_have_count(1)
        expect(page.locator("#shards tr[data-takeover]")).to_have_count(1)
        # Every row is what /api/metrics says of its shard.
        _, metrics = get_json(f"{served16}/api/metrics")
        assert [s["takeover"] is not None for s in metrics["shards"]] == [
            k == taken for k in range(SHARDS16)]
        for shard in metrics["shards"]:
            cells = page.locator(f'#shards tr[data-shard="{shard["shard"]}"] td')
            assert cells.nth(2).inner_text() == str(shard["epoch"])
        # A small phone: nothing wider than the screen, 16 rows and all.
        assert page.evaluate("document.documentElement.scrollWidth") <= SMALL_PHONE["width"]
        if target := os.environ.get("STATUS_PAGE_SCREENSHOT_SHARDS"):
            page.screenshot(path=target, full_page=True)
        held_a.release()
        held_b.release()
    finally:
        page.close()


def test_the_page_says_when_storage_cannot_be_reached_and_recovers(
        browser: Browser, served: str, ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    nowhere = azurite_connection_string(blob_port=free_port(), queue_port=free_port(),
                                        table_port=free_port())
    monkeypatch.setenv("AzureWebJobsStorage", nowhere)
    runtime.reset()
    code, body = get_json(f"{served}/api/metrics")
    assert code == 503
    assert body["retryable"] is True
    assert "storage cannot be reached" in body["error"]
    page = browser.new_page(viewport=PHONE)
    try:
        # In Azure the page is opened with the function key: its polls must carry it too.
        with page.expect_request(lambda r: "/api/metrics?" in r.url) as polled:
            page.goto(f"{served}/api/status?code=the-function-key&refresh=1")
        assert polled.value.url == f"{served}/api/metrics?code=the-function-key"
        expect(page.locator("#banner")).to_contain_text("Storage unreachable", timeout=WAIT_MS)
        expect(page.locator("#banner")).to_contain_text("Retrying every 1 s")
        expect(page.locator("#main")).to_have_class("stale")
        # Storage is back: the page recovers by itself, without a reload.
        monkeypatch.setenv("AzureWebJobsStorage", ns.connection_string)
        runtime.reset()
        expect(page.locator("#banner")).to_contain_text("Live", timeout=WAIT_MS)
        expect(page.locator("#main")).not_to_have_class("stale")
        expect(page.locator("#holder")).to_have_text("no leader")
        expect(page.locator("#epoch")).to_have_text("0")
    finally:
        page.close()


# --- the JSON the page polls, without a browser ------------------------------------------------
def test_a_snapshot_reads_each_store_once_and_puts_commits_in_their_bucket(ns: Namespace) -> None:
    clock = ManualClock()
    app = ns.app(wallclock=clock)
    send(app, *deposit("d1", "alice", "10.00"), *transfer("t1", "alice", "bob", "4.00"))
    clock.advance(65)  # a minute later: one more commit, in a later bucket
    send(app, *deposit("d2", "bob", "1.00"))
    record(app, transfer("p1", "alice", "bob", "1.00")[0])
    counter = CallCounter()
    observed = ns.app(wallclock=clock, request_hook=counter)
    counter.calls.clear()  # creating the app made its tables: count only the snapshot
    clock.advance(5)
    data = status_data.snapshot(observed)
    # fence, lease blob, all outcomes, recent outcomes, the takeover row, completions, parked,
    # the outbox: one call each (pages of 1,000 rows; the poison queue's client is built apart
    # and not counted here).
    assert counter.total == 8, counter.calls
    flow = data["throughput"]
    assert sum(flow["committed"]) == 3
    # Bars sit on whole 10 s of the clock (now is 00:01:10, in the last bar): d2 was decided
    # at 00:01:05, d1 and t1 at 00:00:00.
    assert flow["committed"][-2] == 1, flow["committed"]
    assert flow["committed"][-8] == 2, flow["committed"]
    assert flow["since"] == "2025-12-31T23:56:20+00:00"
    assert flow["committedPerSecondLastMinute"] == round(1 / 60, 2)
    assert data["outcomes"] == {"byStatus": {"committed": 3}, "total": 3, "truncated": False}
    assert data["pending"]["completions"] == 1
    assert data["pending"]["oldestAgeSeconds"] == 5.0
    # One term per invocation that found work: newest first, the current one with its claim.
    assert [(t["epoch"], t["decided"]) for t in data["leaders"]] == [(3, 1), (2, 1), (1, 1)]
    assert data["leaders"][0]["claimedAt"] == data["leader"]["claimedAt"]


def _app_on(ns: Namespace, connection_string: str) -> LedgerApp:
    """An app on this test's names and another storage endpoint (no storage call made)."""
    config = load_config(ns.env(AzureWebJobsStorage=connection_string), instance_id="observer")
    return LedgerApp.create(config, clients_from_connection_string(connection_string, 1))


def test_a_503_names_no_host_port_url_or_account_and_the_log_has_the_detail(
        ns: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there: the connection is refused
    app = _app_on(ns, azurite_connection_string(blob_port=port, queue_port=port, table_port=port))
    with caplog.at_level(logging.WARNING, logger="shared.web.status"):
        reply = status_data.metrics_reply(lambda: app)
    assert reply.status == 503
    assert reply.body == {"error": "storage cannot be reached", "retryable": True}
    shown = json.dumps(reply.body)
    for secret in (str(port), "127.0.0.1", "http", AZURITE_ACCOUNT):
        assert secret not in shown
    [logged] = [r for r in caplog.records if r.name == "shared.web.status"]
    assert logged.levelno == logging.WARNING
    assert str(port) in logged.getMessage(), "the operator's log keeps the whole error"


def test_a_503_for_a_refused_read_keeps_storages_status_and_code(azurite: Azurite,
                                                                  ns: Namespace) -> None:
    wrong_key = base64.b64encode(b"not the account key").decode()
    app = _app_on(ns, ns.connection_string.replace(AZURITE_KEY, wrong_key))
    reply = status_data.metrics_reply(lambda: app)
    assert reply.status == 503
    assert reply.body == {"error": "storage refused the read (403 AuthorizationFailure)",
                          "retryable": True}


def test_lease_time_left_is_a_lower_bound_from_the_claim_and_the_last_commit() -> None:
    claimed = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    left = status_data._lease_left  # the rule itself, on chosen times
    # Just claimed: the whole lease. After a commit 30 s later: at least lease - renew interval.
    assert left(claimed, True, claimed, None, 15, 5) == 15
    assert left(claimed + timedelta(seconds=33), True, claimed,
                claimed + timedelta(seconds=30), 15, 5) == 7
    # Nothing since the claim long ago: no guarantee left, shown as 0, not negative.
    assert left(claimed + timedelta(seconds=90), True, claimed, None, 15, 5) == 0
    # A last commit from the previous epoch says nothing about this lease.
    assert left(claimed + timedelta(seconds=3), True, claimed,
                claimed - timedelta(seconds=1), 15, 5) == 12
    assert left(claimed, False, claimed, None, 15, 5) is None
