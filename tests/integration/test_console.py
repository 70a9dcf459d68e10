"""`logbroker console` driven in real headless Chromium (Debian's chromium and chromedriver, through
selenium pointed at both, so Selenium Manager never downloads anything) over a real 3-broker cluster
with ZooKeeper: the cluster page lists the 3 brokers and the controller, a topic page its partitions
with leader and ISR, a group page the lag per partition and a lag chart, and the message browser a
record the test produced (as text and as pretty JSON; an HTML value is shown as text, not run).

The pages' screenshots are saved by the test (SCREENSHOTS_ENV below; the README shows them)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from logbroker import Admin, Consumer, Producer
from tests.cluster import Cluster
from tests.conftest import REPO, free_port, wait_for
from tests.integration.test_sasl import ALICE_PASSWORD, SaslBroker, pki, sasl_broker  # noqa: F401 - fixtures

pytestmark = pytest.mark.timeout(240)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The pages' screenshots go where LOGBROKER_CONSOLE_SCREENSHOTS says (the README's come from
# `LOGBROKER_CONSOLE_SCREENSHOTS=docs/console python -m pytest tests/integration/test_console.py`),
# else into the test's temporary directory, so a run leaves the checkout as it was.
SCREENSHOTS_ENV = "LOGBROKER_CONSOLE_SCREENSHOTS"
PAGE_WAIT_S = 30.0
ORDER = {"order": 42, "item": "tea", "qty": 3}
HOSTILE = "<script>window.pwned = 1</script><b id='injected'>bold</b>"


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture
def driver() -> Iterator[Any]:
    why = _browser_missing()
    if why is not None:  # README's test command installs them: a missing one is a failure, not a skip
        raise RuntimeError(f"the console test needs a browser: {why}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    d.set_page_load_timeout(PAGE_WAIT_S)
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture
def cluster(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path / "cluster", 3)
    try:
        yield c.start()
    finally:
        c.stop()


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


@contextlib.contextmanager
def _console_process(bootstrap: str, log_path: Path, *extra: str) -> Iterator[str]:
    """`python -m logbroker console` on a free loopback port, serving; terminated (else killed) after."""
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "logbroker", "console", "--listen", f"127.0.0.1:{port}",
                             "--bootstrap", bootstrap, *extra], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _status(url + "/") is not None, 60, "the console to serve /")
        assert proc.poll() is None, log_path.read_text()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture
def console(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    with _console_process(cluster.bootstrap, tmp_path / "console.log", "--lag-sample-s", "0.5") as url:
        yield url


def _fill(cluster: Cluster) -> Consumer:
    """orders: 3 partitions on the 3 brokers; partition 0 gets the JSON order and the hostile value
    first; group billing reads a few records and stays a member (the returned consumer)."""
    with Admin(cluster.bootstrap, request_timeout_ms=10_000) as admin:
        admin.create_topic("orders", partitions=3, replication_factor=3)
        admin.create_topic("emails", partitions=1, replication_factor=3)
        wait_for(lambda: all(len(p.isr) == 3 and p.leader >= 0 for p in admin.describe_topic("orders").partitions),
                 30, "orders fully replicated")
    with Producer(cluster.bootstrap, request_timeout_ms=10_000) as p:
        p.send("orders", json.dumps(ORDER).encode(), key=b"order-42", partition=0, headers=[("source", b"test")])
        p.send("orders", HOSTILE.encode(), key=b"<i>key</i>", partition=0)
        for i in range(30):
            p.send("orders", f"record {i}".encode(), partition=i % 3)
        p.flush(timeout=30)
    c = Consumer(cluster.bootstrap, topics=["orders"], group="billing", request_timeout_ms=10_000,
                 enable_auto_commit=False)
    deadline = time.monotonic() + 30
    read = 0
    while read < 5 and time.monotonic() < deadline:
        read += len(c.poll(timeout_ms=500, max_records=5 - read))
    assert read == 5
    c.commit()
    return c


def _reject_one(cluster: Cluster) -> None:
    """Share group mailers over emails: one record rejected (a dead letter), the other acknowledged."""
    from logbroker import QueueConsumer

    with Producer(cluster.bootstrap, request_timeout_ms=10_000) as p:
        p.send("emails", b"poison", partition=0)
        p.send("emails", b"fine", partition=0)
        p.flush(timeout=30)
    settled = 0
    deadline = time.monotonic() + 30
    with QueueConsumer(cluster.bootstrap, group="mailers", topics=["emails"], auto_offset_reset="earliest") as q:
        while settled < 2 and time.monotonic() < deadline:
            for m in q.poll(timeout_ms=500):
                if m.value == b"poison":
                    m.reject("cannot parse")
                else:
                    m.ack()
                settled += 1
    assert settled == 2


def _wait_page(driver: Any, url: str, condition: Any, what: str) -> None:
    """Load `url` until `condition(driver)` holds (reloading: the console renders on the server)."""
    from selenium.common.exceptions import WebDriverException

    def ok() -> bool:
        driver.get(url)
        try:
            return bool(condition(driver))
        except (WebDriverException, ValueError, IndexError):
            return False

    wait_for(ok, PAGE_WAIT_S, what, interval_s=0.5)


def _rows(driver: Any, table_id: str) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    return [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, f"#{table_id} tr")[1:]]


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    where = os.environ.get(SCREENSHOTS_ENV)
    if not where:
        return tmp_path / "screenshots"
    return Path(where) if Path(where).is_absolute() else REPO / where


def _shot(driver: Any, name: str, screenshots: Path) -> None:
    screenshots.mkdir(parents=True, exist_ok=True)
    height = max(600, min(2400, int(driver.execute_script("return document.body.scrollHeight")) + 20))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
    try:
        assert driver.save_screenshot(str(screenshots / f"{name}.png"))
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@pytest.mark.slow
def test_console_pages_in_headless_chromium(cluster: Cluster, console: str, driver: Any,
                                            screenshots: Path) -> None:
    from selenium.webdriver.common.by import By

    member = _fill(cluster)
    try:
        controller = cluster.describe_cluster().controller_id
        # the cluster page: the 3 brokers with their addresses, the controller marked
        _wait_page(driver, console + "/", lambda d: len(_rows(d, "brokers")) == 3, "3 brokers on the cluster page")
        brokers = _rows(driver, "brokers")
        assert [int(r[0]) for r in brokers] == [0, 1, 2]
        assert {r[1] for r in brokers} == {b.address for b in cluster.brokers.values()}
        assert [int(r[0]) for r in brokers if r[3] == "controller"] == [controller]
        assert driver.find_element(By.ID, "controller").text == f"broker {controller}"
        assert _rows(driver, "health")[1:] == [["offline", "0"], ["under replicated", "0"], ["under min isr", "0"]]
        _shot(driver, "cluster", screenshots)

        # a topic page: partitions with leader, replicas and ISR
        driver.get(console + "/topics/orders")
        parts = _rows(driver, "partitions")
        assert [int(r[0]) for r in parts] == [0, 1, 2]
        for r in parts:
            assert int(r[1]) in (0, 1, 2) and sorted(r[2].split(",")) == ["0", "1", "2"]
            assert sorted(r[3].split(",")) == ["0", "1", "2"]
        assert int(parts[0][5]) == 12  # end offset: the 2 records first, then 10 of the 30
        _shot(driver, "topic", screenshots)

        # the group page: lag per partition (12 + 10 + 10 records, 5 committed) and a chart of it,
        # which rises when 20 more records come after the console sampled the lag twice
        def charted(total: int, samples: int) -> Any:
            def check(d: Any) -> bool:
                points = d.find_element(By.CSS_SELECTOR, "svg#lag-chart polyline").get_attribute("points").split()
                return len(points) >= samples and sum(int(r[4]) for r in _rows(d, "lag")) == total
            return check

        _wait_page(driver, console + "/groups/billing", charted(32 - 5, 2), "the lag of billing and its chart")
        with Producer(cluster.bootstrap, request_timeout_ms=10_000) as p:
            for i in range(20):
                p.send("orders", f"late {i}".encode(), partition=1)
            p.flush(timeout=30)
        _wait_page(driver, console + "/groups/billing", charted(52 - 5, 6), "the lag of billing rising")
        assert {int(r[1]) for r in _rows(driver, "lag")} == {0, 1, 2}
        ys = [float(pt.split(",")[1]) for pt in driver.find_element(
            By.CSS_SELECTOR, "svg#lag-chart polyline").get_attribute("points").split()]
        assert ys[-1] < ys[0]  # higher on the screen: more lag now than at first
        _shot(driver, "group", screenshots)

        # the message browser: the JSON record pretty printed, the hostile one as inert text
        driver.get(console + "/topics/orders/messages?partition=0&offset=0&count=5&view=json")
        rows = _rows(driver, "messages")
        assert rows[0][0] == "0" and rows[0][2] == "order-42" and "source: test" in rows[0][3]
        assert json.loads(rows[0][4]) == ORDER and '\n  "order": 42,' in rows[0][4]
        assert rows[1][2] == "<i>key</i>" and HOSTILE in rows[1][4]
        assert driver.find_elements(By.ID, "injected") == []
        assert driver.execute_script("return window.pwned === undefined")
        _shot(driver, "messages", screenshots)
        driver.get(console + "/topics/orders/messages?partition=0&offset=0&count=1&view=text")
        assert _rows(driver, "messages")[0][4] == json.dumps(ORDER)
        driver.get(console + "/topics/orders/messages?partition=0&offset=0&count=1&view=hex")
        assert _rows(driver, "messages")[0][4].startswith("00000000  7b 22 6f 72")

        # share groups: a rejected record is a dead letter the queue page shows and links to
        _reject_one(cluster)
        _wait_page(driver, console + "/queues", lambda d: _rows(d, "groups")[0][0] == "mailers", "the share group")
        _wait_page(driver, console + "/queues/mailers",
                   lambda d: sum(int(r[2]) for r in _rows(d, "dead-letters")) == 1, "the dead letter")
        assert any(r[0] == "emails" for r in _rows(driver, "queue-partitions"))
        _shot(driver, "queue", screenshots)

        # errors are pages with the message
        driver.get(console + "/topics/nope")
        assert "nope" in driver.find_element(By.ID, "error").text
    finally:
        member.close()



def _post(url: str, form: dict[str, str], origin: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if origin is not None:
        headers["Origin"] = origin
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=15) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.timeout(120)
def test_changes_only_from_a_read_write_console_with_its_token(broker, tmp_path: Path) -> None:
    """Plain HTTP (no browser): a read-only console refuses a POST; a --read-write one creates a topic
    from its form with its token, and refuses a forged token or another site's Origin."""
    with _console_process(broker.bootstrap, tmp_path / "ro.log") as url:
        status, body = _post(url + "/topics", {"name": "nope", "csrf": "x"})
        assert status == 403 and "read-only" in body
    with _console_process(broker.bootstrap, tmp_path / "rw.log", "--read-write") as url:
        with urllib.request.urlopen(url + "/topics", timeout=15) as r:
            token = re.search(r"name='csrf' value='([^']+)'", r.read().decode())
        assert token is not None
        assert _post(url + "/topics", {"name": "forged", "csrf": "wrong"})[0] == 403
        assert _post(url + "/topics", {"name": "cross", "csrf": token.group(1)}, origin="http://evil.example")[0] == 403
        status, body = _post(url + "/topics", {"name": "made-here", "partitions": "2", "csrf": token.group(1)},
                             origin=url)
        assert status == 200, body
        status, body = _post(url + "/topics", {"name": "bad", "partitions": "two", "csrf": token.group(1)})
        assert status == 400 and "whole numbers" in body
    with Admin(broker.bootstrap, request_timeout_ms=5000) as admin:
        assert sorted(admin.list_topics()) == ["made-here"]
        assert len(admin.describe_topic("made-here").partitions) == 2


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.timeout(120)
def test_the_console_logs_in_as_its_user_on_an_authenticating_broker(sasl_broker: SaslBroker,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    """--tls-ca/--sasl-* as every client command: alice's console lists the topics and reads her
    topic's records (the cluster page, which she may not describe, is an error page); a console
    without a login shows the broker's refusal as a page, no stack trace."""
    b = sasl_broker.broker
    with Producer(b.bootstrap, tls=sasl_broker.ca_only, sasl=_alice()) as p:
        p.send("orders", b"for-the-console").get(timeout=15)
    password = tmp_path / "alice.pw"
    password.write_text(ALICE_PASSWORD + "\n")
    with _console_process(b.bootstrap, tmp_path / "alice.log", "--tls-ca", str(sasl_broker.ca_only.ca_file),
                          "--sasl-user", "alice", "--sasl-password-file", str(password)) as url:
        status, body = _get(url + "/topics")
        assert status == 200 and "orders" in body, re.sub("<[^>]+>", " ", body)[-400:]
        status, body = _get(url + "/")  # alice may not describe the cluster: the page says so
        assert status == 502 and "not authorized to Describe a Cluster" in body
        status, body = _get(url + "/topics/orders/messages?partition=0&offset=0")
        assert status == 200 and "for-the-console" in body
    with _console_process(b.bootstrap, tmp_path / "anonymous.log", "--tls-ca", str(sasl_broker.ca_only.ca_file)) \
            as url:
        status, body = _get(url + "/topics")
        assert status == 502 and "UNAUTHENTICATED" in body.upper() and "Traceback" not in body


def _alice() -> Any:
    from logbroker.client.sasl import SaslConfig

    return SaslConfig("alice", ALICE_PASSWORD)
