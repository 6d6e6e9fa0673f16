"""The reading tool driven in headless Chromium on the tiny workflow's reading lists: a reader draws a lesion's
two axes through the page's own controls, grades the image, presses Done; the lesions and reads CSV files then
hold that read; reopening resumes at the next case; nothing in a blinded session's page or traffic names the
patient, the modality or a source file.

Needs Debian's ``chromium`` and ``chromium-driver`` and Selenium (``pip install -e '.[test]'``); skips without
them, fails instead when ``VC_REQUIRE_BROWSER=1`` (CI sets it, see ``.ci/run``).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from virtual_contrast.annotations import load_lesions, load_reads
from virtual_contrast.reader import viewer
from virtual_contrast.reader.protocol import CASE_IMAGE, KEY_NAME, load_key
from virtual_contrast.reading_copy import STORED_DTYPE

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Whole words, any case, and the workflow's channel names (lowT1c, refT1c).
MODALITY_WORDS = re.compile(r"(?i)(?<![a-z])(low|vir|ref)(?![a-z]|T1c)|lowT1c|refT1c")


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if not viewer.VIEWER_PATH.exists():
        missing.append(f"the NiiVue viewer ({viewer.VIEWER_PATH}: make viewer)")
    if missing:
        msg = f"headless browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("VC_REQUIRE_BROWSER", "") == "1":
            pytest.fail(msg + " and VC_REQUIRE_BROWSER=1")
        pytest.skip(msg)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


def _start(lists: Path, key: Path, out: Path, reader: str, phase: int):
    from virtual_contrast.reader.server import serve
    from virtual_contrast.reader.session import ReadingSession

    server = serve(ReadingSession(lists, key, reader, out, phase=phase), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _stop(server) -> None:
    server.shutdown()
    server.server_close()


def _wait(driver, condition, what: str, timeout: float = 60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(condition)
        if value:
            return value
        if driver.execute_script("return document.body.dataset.state") == "error":
            raise AssertionError(driver.find_element("id", "progress").text)
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _wait_ready(driver, not_case: str | None = None) -> str:
    return _wait(
        driver,
        "const b = document.body.dataset; return b.state === 'ready' && b.case !== "
        f"{json.dumps(not_case)} ? b.case : null",
        "a case to be displayed",
    )


def _location(driver) -> np.ndarray:
    return np.array(
        [
            float(v)
            for v in driver.find_element("id", "location").get_attribute("data-mm").split(",")
        ]
    )


def _drag(driver, canvas, start: tuple[int, int], end: tuple[int, int]) -> None:
    """Left-drag on the canvas, offsets in CSS pixels from its centre."""
    from selenium.webdriver.common.action_chains import ActionChains

    actions = ActionChains(driver, duration=20)
    actions.move_to_element_with_offset(canvas, *start).click_and_hold()
    steps = 6
    for k in range(1, steps + 1):  # intermediate moves, as a hand would, ending exactly at ``end``
        dx = (end[0] - start[0]) * k // steps - (end[0] - start[0]) * (k - 1) // steps
        dy = (end[1] - start[1]) * k // steps - (end[1] - start[1]) * (k - 1) // steps
        actions.move_by_offset(dx, dy)
    actions.release().perform()


def _click(driver, canvas, at: tuple[int, int]) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver, duration=20).move_to_element_with_offset(canvas, *at).click().perform()


@pytest.fixture(scope="module")
def one_case_read(browser, tiny_run, tmp_path_factory):
    """R1 reads the first case of phase 1 (blinded) in the browser; the page's traffic is kept for scanning."""
    lists = tiny_run / "results" / "reader_study" / "reading_lists"
    key_path = tiny_run / "results" / "reader_study" / KEY_NAME
    out = tmp_path_factory.mktemp("readings")
    key = load_key(key_path)
    cases = key[(key["reader"] == "R1") & (key["phase"] == 1)].sort_values("order")
    server = _start(lists, key_path, out, "R1", 1)
    driver = browser
    driver.get("about:blank")
    driver.get_log("performance")  # start the traffic record here
    t_open = time.monotonic()
    driver.get(server.url)
    first = _wait_ready(driver)
    t_shown = time.monotonic()
    canvas = driver.find_element("id", "canvas-post")

    # Where the canvas is in world mm: three clicks with the cursor tool, read back from the location display.
    driver.find_element("css selector", "[data-tool=cursor]").click()
    probes = {}
    for name, at in (("origin", (0, 0)), ("right", (100, 0)), ("down", (0, 100))):
        _click(driver, canvas, at)
        time.sleep(0.2)
        probes[name] = _location(driver)

    def world(px: int, py: int) -> np.ndarray:
        o = probes["origin"]
        return o + (probes["right"] - o) * px / 100 + (probes["down"] - o) * py / 100

    # A lesion: long axis 120 px across, short axis 60 px down, crossing at (10, 5).
    long_px, short_px = ((-50, 5), (70, 5)), ((10, -25), (10, 35))
    driver.find_element("css selector", "[data-tool=measure]").click()
    _drag(driver, canvas, *long_px)
    _drag(driver, canvas, *short_px)
    lesions_shown = driver.find_element("id", "lesions").text
    pages = [driver.page_source]
    driver.find_element("css selector", "input[name=quality][value='4']").click()
    time.sleep(0.5)
    done = driver.find_element("id", "done")
    assert done.is_enabled(), driver.find_element("id", "pending").text
    t_done = time.monotonic()
    done.click()
    second = _wait_ready(driver, not_case=first)
    t_saved = time.monotonic()
    traffic = _traffic(driver, server.url)
    pages += [driver.page_source, driver.find_element("tag name", "body").text]
    expected = {
        "long": [world(*p) for p in long_px],
        "short": [world(*p) for p in short_px],
    }
    state = {
        "driver": driver,
        "server": server,
        "url": server.url,
        "lists": lists,
        "key_path": key_path,
        "cases": cases,
        "out": out,
        "first": first,
        "second": second,
        "expected": expected,
        "lesions_shown": lesions_shown,
        "time_bounds": (t_done - t_shown, t_saved - t_open),
        "traffic": traffic,
        "page": "\n".join(pages),
        "patients": sorted(key["patient"].unique()),
        "voxel_mm": float(
            max(
                nib.load(
                    lists / "R1" / "phase-1" / CASE_IMAGE.format(case_id=first)
                ).header.get_zooms()
            )
        ),
    }
    yield state
    _stop(state["server"])


def _traffic(driver, base_url: str) -> list[dict]:
    """Every request of the page since the log was last read: URL, method, body, response headers and body.

    A response body that the browser no longer holds is fetched again from the server (the same bytes: GET
    responses of the session depend only on the URL and the saved reads).
    """
    exchanges: dict[str, dict] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            request = params["request"]
            exchanges.setdefault(params["requestId"], {}).update(
                url=request["url"], method=request["method"], post=request.get("postData", "")
            )
        elif message["method"] == "Network.responseReceived":
            exchanges.setdefault(params["requestId"], {}).update(
                status=params["response"]["status"], headers=params["response"]["headers"]
            )
    for request_id, exchange in exchanges.items():
        if not exchange.get("url", "").startswith(base_url):
            continue
        try:
            body = driver.execute_cdp_cmd("Network.getResponseBody", {"requestId": request_id})
            raw = body["body"]
            exchange["body"] = base64.b64decode(raw) if body["base64Encoded"] else raw.encode()
        except Exception:  # evicted from the browser's buffer
            if exchange["method"] == "GET":
                with urllib.request.urlopen(exchange["url"]) as response:
                    exchange["body"] = response.read()
    return [e for e in exchanges.values() if "url" in e]


def test_a_read_in_the_browser_lands_in_the_csv_files_and_reopening_resumes(one_case_read) -> None:
    r = one_case_read
    cases = r["cases"]
    assert r["first"] == cases["case_id"].iloc[0], "the session starts at the list's first case"
    assert r["second"] == cases["case_id"].iloc[1], "after Done comes the list's next case"
    first = cases.iloc[0]
    lesions = load_lesions(r["out"] / "lesions.csv")
    reads = load_reads(r["out"] / "reads.csv")
    assert len(lesions) == 1 and len(reads) == 1
    lesion = lesions.iloc[0]
    assert (lesion["patient"], lesion["reader"], lesion["modality"]) == (
        first["patient"],
        "R1",
        first["modality"],
    )
    (l0, l1), (s0, s1) = r["expected"]["long"], r["expected"]["short"]
    voxel = r["voxel_mm"]
    assert lesion["long_axis_mm"] == pytest.approx(np.linalg.norm(l1 - l0), abs=voxel)
    assert lesion["short_axis_mm"] == pytest.approx(np.linalg.norm(s1 - s0), abs=voxel)
    centre = ((l0 + l1) / 2 + (s0 + s1) / 2) / 2
    assert np.linalg.norm(lesion[["x_mm", "y_mm", "z_mm"]].to_numpy(float) - centre) < voxel
    # the page listed the same lesion
    assert f"{lesion['long_axis_mm']:.1f} × {lesion['short_axis_mm']:.1f} mm" in r["lesions_shown"]

    read = reads.iloc[0]
    assert (read["patient"], read["modality"], read["quality"]) == (
        first["patient"],
        first["modality"],
        4,
    )
    shortest, longest = r["time_bounds"]
    assert shortest - 0.5 <= read["reading_time_s"] <= longest + 0.5

    # Reopening: a new server (new token) on the same session starts at the next case; the old URL is refused.
    old_url = r["server"].url
    _stop(r["server"])
    r["server"] = server = _start(r["lists"], r["key_path"], r["out"], "R1", 1)
    stale = old_url.replace(f":{_port(old_url)}/", f":{_port(server.url)}/")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(stale)
    assert refused.value.code == 403
    driver = r["driver"]
    driver.get(server.url)
    assert _wait_ready(driver) == r["second"]
    assert "1 of 2 cases read" in driver.find_element("id", "progress").text


def _port(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


def _nifti(body: bytes) -> bytes:
    """A served image as .nii bytes (gzip is its transfer encoding: inflated by the browser, not by urllib)."""
    return gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body


def _nifti_header_text(raw: bytes) -> str:
    """The NIfTI header and extensions (the voxel data are numbers, not text)."""
    offset = int(nib.Nifti1Header.from_fileobj(io.BytesIO(raw))["vox_offset"])
    return raw[: max(offset, 348)].decode("latin-1")


def test_a_blinded_session_names_no_patient_modality_or_source_file(
    one_case_read, tiny_run
) -> None:
    r = one_case_read
    key = load_key(r["key_path"])
    sources = {
        name
        for path in (tiny_run / "results").glob("sub-*/*/*.nii.gz")
        for name in (path.name, path.name.split(".")[0])
    }
    other_cases = set(key["case_id"]) - set(r["cases"]["case_id"])
    forbidden = [*r["patients"], *sorted(sources), *sorted(other_cases)]
    assert sources and other_cases

    def scan(text: str, where: str) -> None:
        found = [f for f in forbidden if f in text] + MODALITY_WORDS.findall(text)
        assert not found, f"{where} reveals {found[:5]}"

    scan(r["page"], "the page")
    traffic = r["traffic"]
    kinds = {"page": 0, "image": 0, "api": 0, "post": 0}
    for exchange in traffic:
        url = exchange["url"]
        if url.startswith("data:"):
            # an image made inside the page (the viewer's font atlas): it goes to no server
            assert url.startswith("data:image/"), url[:80]
            continue
        scan(url + "\n" + exchange.get("post", ""), f"request {url}")
        scan(json.dumps(exchange.get("headers", {})), f"response headers of {url}")
        body = exchange.get("body")
        assert body is not None, f"no response body seen for {url}"
        if url.endswith("/niivue.js"):
            # the third-party viewer, the same file for every session: it cannot tell one case from another
            assert body == viewer.VIEWER_PATH.read_bytes()
        elif url.endswith(".nii"):
            raw = _nifti(body)
            # sent uncompressed: a compressed size would tell how noisy the image is
            assert raw == body and "Content-Encoding" not in exchange.get("headers", {})
            scan(_nifti_header_text(raw), f"the NIfTI header of {url}")
            hdr = nib.Nifti1Image.from_bytes(raw).header
            assert hdr["descrip"].item() == b"" and hdr.get_data_dtype() == STORED_DTYPE
            kinds["image"] += 1
        else:
            scan(body.decode("utf-8"), f"the response to {url}")
            kinds["api" if "/api/" in url else "page"] += 1
        kinds["post"] += exchange["method"] == "POST"
    # the scan saw the page, its script, the three images of two cases, the session API and the saved read
    assert (
        kinds["page"] >= 3 and kinds["image"] >= 6 and kinds["api"] >= 3 and kinds["post"] == 1
    ), kinds
    elsewhere = [e["url"][:80] for e in traffic if not e["url"].startswith((r["url"], "data:"))]
    assert not elsewhere, f"requests outside the session: {elsewhere}"


def test_the_three_views_follow_one_cursor_view_and_the_window_is_set_by_hand(
    one_case_read,
) -> None:
    driver = one_case_read["driver"]
    _wait_ready(driver)
    canvas = driver.find_element("id", "canvas-post")
    driver.find_element("css selector", "[data-tool=cursor]").click()
    _click(driver, canvas, (-40, 30))
    time.sleep(0.2)
    where = (
        "return Array.from(viewers[arguments[0]].frac2mm(viewers[arguments[0]].scene.crosshairPos))"
    )
    post = np.array(driver.execute_script(where, "post"))[:3]
    assert np.allclose(post, _location(driver), atol=1e-3)
    for series in ("t1", "flair"):
        assert np.allclose(driver.execute_script(where, series)[:3], post, atol=1e-3), series
    # the mouse wheel on the post-contrast image moves the slice of all three
    from selenium.webdriver.common.action_chains import ActionChains, ScrollOrigin

    before = driver.find_element("id", "slice-number").text
    ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, 120).perform()
    time.sleep(0.3)
    moved = np.array(driver.execute_script(where, "post"))[:3]
    assert driver.find_element("id", "slice-number").text != before
    # NiiVue steps one voxel and centres the cursor in its voxel
    voxel = one_case_read["voxel_mm"]
    assert moved[2] != pytest.approx(post[2]) and np.allclose(moved[:2], post[:2], atol=voxel / 2)
    for series in ("t1", "flair"):
        assert np.allclose(driver.execute_script(where, series)[:3], moved, atol=1e-3), series
    # the arrow keys the page advertises move the slice of all three, one at a time (issue 25: they did not)
    from selenium.webdriver.common.keys import Keys

    index = int(driver.find_element("id", "slice-number").text.split("/")[0])
    driver.execute_script("arguments[0].focus()", canvas)  # as after a click on the image
    for key, step in ((Keys.ARROW_UP, 1), (Keys.ARROW_UP, 1), (Keys.ARROW_DOWN, -1)):
        ActionChains(driver).send_keys(key).perform()
        time.sleep(0.3)
        index += step
        assert int(driver.find_element("id", "slice-number").text.split("/")[0]) == index, key
    keyed = np.array(driver.execute_script(where, "post"))[:3]
    assert np.allclose(keyed[:2], moved[:2], atol=voxel / 2)
    for series in ("t1", "flair"):
        assert np.allclose(driver.execute_script(where, series)[:3], keyed, atol=1e-3), series
    slice_type = "return ['post', 't1', 'flair'].map((s) => viewers[s].opts.sliceType)"
    assert driver.execute_script(slice_type) == [0, 0, 0]  # axial
    for button, expected in (("coronal", 1), ("sagittal", 2), ("axial", 0)):
        driver.find_element("css selector", f"[data-view={button}]").click()
        assert driver.execute_script(slice_type) == [expected] * 3, button
    window = driver.find_element("css selector", ".wl[data-series=post] .w")
    level = driver.find_element("css selector", ".wl[data-series=post] .l")
    for box, value in ((window, "0.5"), (level, "0.4")):
        box.clear()
        box.send_keys(value + "\t")
    cal = driver.execute_script("const v = viewers.post.volumes[0]; return [v.cal_min, v.cal_max]")
    assert cal == pytest.approx([0.15, 0.65])
