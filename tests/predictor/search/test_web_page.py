"""The web page in a real headless Chromium (Debian's ``chromium`` driven by Playwright): upload
a real photo, see ranked results, drag a crop, click a result to search with it (and log the
click), and read clear error messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures.search import start_search_server

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                       "(apt-get install -y chromium chromium-driver)"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright for Python is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, search_server):
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    errors = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(search_server.url + "/")
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def rendered(pg) -> list[tuple[str, str]]:
    cards = pg.locator("[data-testid=result]")
    return [(cards.nth(i).get_attribute("data-id"), cards.nth(i).locator(".score").inner_text())
            for i in range(cards.count())]


def upload_a_broken_jpeg(pg, tmp_path) -> None:
    """Picks a file that claims to be a JPEG but is not; the server refuses it (400) and the
    page's status turns to its error state."""
    fake = tmp_path / "broken.jpg"
    fake.write_bytes(b"\xff\xd8 definitely not a JPEG")
    with pg.expect_response(lambda r: r.url.endswith("/search")) as resp:
        pg.set_input_files("[data-testid=file]", str(fake))
    assert resp.value.status == 400
    pg.wait_for_function("() => document.querySelector('[data-testid=status]').dataset.state === 'error'")


def test_upload_crop_and_click_in_a_real_browser(page, search_server, tmp_path):
    pg, cat = page, search_server.catalog
    photo = cat.files["photo-03"]

    # 1. upload a real photo: the results appear, the photo itself first with score 1.000
    with pg.expect_response(lambda r: r.url.endswith("/search")) as first:
        pg.set_input_files("[data-testid=file]", str(photo))
    whole = first.value.json()
    pg.wait_for_selector("[data-testid=result]")
    assert rendered(pg) == [(r["id"], f"{r['score']:.3f}") for r in whole["results"]]
    # the page names this browser with a first-party cookie (an experiment's unit), sent along
    uid = [c for c in pg.context.cookies() if c["name"] == "vsearch_uid"]
    assert len(uid) == 1 and len(uid[0]["value"]) == 32 and uid[0]["sameSite"] == "Lax"
    assert f"vsearch_uid={uid[0]['value']}" in (first.value.request.header_value("cookie") or "")
    assert rendered(pg)[0] == ("photo-03", "1.000")
    assert "secret" not in [i for i, _ in rendered(pg)]
    assert "result" in pg.inner_text("[data-testid=status]")
    # thumbnails load from /images/<id>
    pg.wait_for_function("() => { const i = document.querySelector('[data-testid=result] img');"
                         " return i && i.complete && i.naturalWidth > 0; }")

    # 2. drag a box on the image: a crop query, with different results
    box = pg.locator("[data-testid=query-image]").bounding_box()
    with pg.expect_response(lambda r: r.url.endswith("/search")) as second:
        pg.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.15)
        pg.mouse.down()
        pg.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4, steps=5)
        pg.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.7, steps=5)
        pg.mouse.up()
    crop_sent = pg.get_attribute("[data-testid=crop-text]", "data-sent")
    x0, y0, x1, y1 = map(float, crop_sent.split(","))
    assert (x0, y0, x1, y1) == pytest.approx((0.1, 0.15, 0.6, 0.7), abs=0.02)
    cropped = second.value.json()
    pg.wait_for_function(
        "(first) => { const c = document.querySelector('[data-testid=result]');"
        " return c && c.querySelector('.score').textContent === first; }",
        arg=f"{cropped['results'][0]['score']:.3f}")
    assert rendered(pg) == [(r["id"], f"{r['score']:.3f}") for r in cropped["results"]]
    # the same crop through the API gives the same ranking: the page sent the box it drew
    api = search_server.search(photo.read_bytes(), crop=crop_sent, log_impression="false").json()
    assert [(r["id"], r["score"]) for r in api["results"]] == [(r["id"], r["score"]) for r in cropped["results"]]
    assert [(r["id"], r["score"]) for r in cropped["results"]] != [(r["id"], r["score"]) for r in whole["results"]]
    assert pg.inner_text("[data-testid=crop-text]").startswith("Crop 0.1")
    assert pg.locator("[data-testid=crop-box]").is_visible()
    pg.screenshot(path=str(tmp_path / "results.png"), full_page=True)
    shot_dir = os.environ.get("VSEARCH_SCREENSHOT_DIR")
    if shot_dir:
        pg.screenshot(path=str(Path(shot_dir) / "search-page.png"), full_page=True)

    # 3. click the second result: the click is logged, then the page searches with that image
    target = rendered(pg)[1][0]
    with pg.expect_response(lambda r: r.url.endswith("/events")) as ev, \
            pg.expect_response(lambda r: r.url.endswith("/search")) as third:
        pg.locator("[data-testid=result]").nth(1).click()
    event = ev.value
    assert event.status == 200 and event.json()["events"][0]["accepted"] is True
    posted = json.loads(event.request.post_data)
    assert posted == {"type": "click", "token": cropped["token"], "item_id": target}
    assert third.value.json()["results"][0]["id"] in (target, )
    pg.wait_for_function("(id) => { const c = document.querySelector('[data-testid=result]');"
                         " return c && c.dataset.id === id; }", arg=target)
    assert pg.inner_text("[data-testid=crop-text]") == "Whole image"


def test_errors_are_shown_clearly(page, search_server, tmp_path):
    pg = page
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    pg.set_input_files("[data-testid=file]", str(text))
    status = pg.locator("[data-testid=status]")
    assert "not an image" in status.inner_text() and status.get_attribute("data-state") == "error"

    # a file that claims to be an image but is not: the server's reason is shown
    upload_a_broken_jpeg(pg, tmp_path)
    assert "refused" in status.inner_text() and "image" in status.inner_text()

    # k out of range: the server's 400 reason is shown; a valid k works again
    pg.set_input_files("[data-testid=file]", str(search_server.catalog.files["photo-05"]))
    pg.wait_for_selector("[data-testid=result]")
    pg.fill("[data-testid=k]", "0")
    with pg.expect_response(lambda r: r.url.endswith("/search")) as bad:
        pg.click("[data-testid=search]")
    assert bad.value.status == 400
    pg.wait_for_function("() => document.querySelector('[data-testid=status]').dataset.state === 'error'")
    assert "k must" in status.inner_text()
    pg.fill("[data-testid=k]", "3")
    with pg.expect_response(lambda r: r.url.endswith("/search")) as good:
        pg.click("[data-testid=search]")
    assert good.value.status == 200
    pg.wait_for_function("() => document.querySelectorAll('[data-testid=result]').length === 3")
    assert status.get_attribute("data-state") == "ok"


def test_dropping_an_image_searches_with_it(page, search_server):
    pg = page
    data = list(search_server.catalog.photos["photo-07"])
    transfer = pg.evaluate_handle(
        "(bytes) => { const dt = new DataTransfer();"
        " dt.items.add(new File([new Uint8Array(bytes)], 'dropped.jpg', {type: 'image/jpeg'}));"
        " return dt; }", data)
    with pg.expect_response(lambda r: r.url.endswith("/search")) as resp:
        pg.dispatch_event("[data-testid=drop]", "drop", {"dataTransfer": transfer})
    assert resp.value.status == 200
    pg.wait_for_function("() => { const c = document.querySelector('[data-testid=result]');"
                         " return c && c.dataset.id === 'photo-07'; }")
    assert pg.locator("[data-testid=query-image]").is_visible()


@pytest.fixture(scope="module")
def strict_server(search_catalog, tiny_model_dir, milvus_server_uri, tmp_path_factory):
    """The same catalog behind a server whose "nothing is close" threshold is above any score."""
    root = tmp_path_factory.mktemp("strict-search")
    svc = start_search_server(milvus_uri=milvus_server_uri, alias=search_catalog.alias, model_dir=tiny_model_dir,
                              log_path=root / "search.log", extra=("--weak-match-score", "1.5",
                                                                   "--image-roots", str(search_catalog.root)))
    yield svc
    svc.stop()


def test_bad_files_clear_the_old_results_and_the_header_names_the_model(page, search_server, tmp_path):
    """After a good search, a file the browser cannot show: no broken-image icon, the old
    results are gone, the server's reason is shown. The header names the model and its
    version, never the collection; ids are shown whole (they wrap)."""
    pg, cat = page, search_server.catalog
    with pg.expect_response(lambda r: r.url.endswith("/search")) as first:
        pg.set_input_files("[data-testid=file]", str(cat.files["photo-02"]))
    answer = first.value.json()
    pg.wait_for_selector("[data-testid=result]")
    header = pg.inner_text("[data-testid=model]")
    assert header == f"model {answer['model']['name']}, version {answer['model']['version']}", header
    assert answer["collection"] not in header and "__" not in header
    # ids whole: no card's id is cut (its box is as wide as its text), and each has its tooltip
    cut = pg.evaluate("() => [...document.querySelectorAll('[data-testid=result] .id')]"
                      ".filter(e => e.scrollWidth > e.clientWidth + 1 || !e.title).map(e => e.textContent)")
    assert cut == []
    assert not pg.locator("[data-testid=weak-hint]").is_visible()       # real matches: no hint

    upload_a_broken_jpeg(pg, tmp_path)
    assert pg.locator("[data-testid=result]").count() == 0
    assert not pg.locator("[data-testid=query-image]").is_visible()      # no broken-image icon
    assert "image" in pg.inner_text("[data-testid=status]")

    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    pg.set_input_files("[data-testid=file]", str(cat.files["photo-04"]))
    pg.wait_for_selector("[data-testid=result]")
    pg.set_input_files("[data-testid=file]", str(text))
    assert pg.locator("[data-testid=result]").count() == 0 and "not an image" in pg.inner_text("[data-testid=status]")


def test_long_ids_wrap_whole(page, search_server):
    """A long id in a narrow card wraps instead of being cut (the page's own renderer)."""
    pg = page
    long_id = "catalog-item-" + "x" * 80 + "-end"
    pg.evaluate("(id) => render([{id, score: 0.9, uri: '/images/' + id, metadata: {}}])", long_id)
    card = pg.locator("[data-testid=result] .id").first
    assert card.inner_text().endswith("-end") and card.get_attribute("title") == long_id
    assert pg.evaluate("() => { const e = document.querySelector('[data-testid=result] .id');"
                       " return e.scrollWidth <= e.clientWidth + 1; }")


def test_a_hint_says_when_nothing_is_close(browser, strict_server, search_catalog):
    """With the threshold a setting above every score (1.5 here), the page says nothing is close."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    try:
        pg.goto(strict_server.url + "/")
        config = pg.evaluate("() => fetch('/api/config').then(r => r.json())")
        assert config["weak_match_score"] == 1.5
        pg.wait_for_function("() => state.config !== null")          # the page read its config
        with pg.expect_response(lambda r: r.url.endswith("/search")):
            pg.set_input_files("[data-testid=file]", str(search_catalog.files["photo-01"]))
        pg.wait_for_selector("[data-testid=weak-hint]:not([hidden])")
        assert "Nothing in the catalog is close" in pg.inner_text("[data-testid=weak-hint]")
    finally:
        ctx.close()
