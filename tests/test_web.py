"""The web page at GET /, in a real browser: Playwright for Python drives Debian's chromium (the
package, via executable_path) against real `limoe serve` processes, one browser for the module.

Two servers start side by side: the default limoe-small (3 MoE layers, dropless) with a small
image limit, serving limoe-tiny beside it (LIMOE_MODELS: the page's model picker), and
limoe-tiny with API keys on; a third serves a tiny entry with capacity routing,
which drops tokens. Every page visit records
the requests the page makes and checks that each went to its own server; axe-core (vendored in
tests/vendor/) checks accessibility in the browser. Screenshots (desktop and phone) are written
to build/test-artifacts/.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from servers import ROOT, Server

SAMPLES = ROOT / "service" / "web" / "samples"
AXE = Path(__file__).parent / "vendor" / "axe.min.js"
ARTIFACTS = ROOT / "build" / "test-artifacts"
IMAGE_LIMIT = 64 * 1024  # bytes, on the open server
KEY = "web-page-test-key"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def servers():
    """{"open": base URL of limoe-small (and limoe-tiny), "keyed": base URL of limoe-tiny with a key required}."""
    with contextlib.ExitStack() as stack:
        common = {"max_batch_size": 4, "spinning": "false", "threads": 1}
        started = {"open": Server("web open", models="limoe-small,limoe-tiny", max_image_bytes=IMAGE_LIMIT,
                                  **common),
                   "keyed": Server("web keyed", model="limoe-tiny", api_keys=KEY, **common)}
        for server in started.values():  # both start before either is waited for
            stack.enter_context(server)
        for server in started.values():
            server.wait_ready()
        yield {name: server.base for name, server in started.items()}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "the Debian package 'chromium' must be installed (make test does it)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


class Visit:
    """One page of a fresh browser context on `base`, recording every request it makes."""

    def __init__(self, browser, base: str, **context):
        self.base = base
        self.context = browser.new_context(**{"viewport": DESKTOP, **context})
        self.context.add_init_script(path=str(AXE))  # before the page's own scripts; not subject to its CSP
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.goto(base + "/")

    def elsewhere(self) -> list[str]:
        """Requests to any other host than this server."""
        return [url for url in self.requests if not url.startswith((self.base + "/", "data:", "blob:"))]

    def axe(self) -> list[dict]:
        """axe-core's violations (WCAG 2.1 A and AA, and its best practices) on the page as it is now."""
        return self.page.evaluate("""async () => {
            const r = await axe.run(document, {runOnly: ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]});
            return r.violations.map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target.join(" "))}));
        }""")

    def classify(self, files, labels: str) -> None:
        """Choose `files`, replace the default labels (the samples') by `labels`, submit."""
        self.page.wait_for_selector("#label-chips li")  # the defaults are in
        while self.page.locator("#label-chips li").count():  # Backspace in the empty field removes a chip
            self.page.press("#labels", "Backspace")
        self.page.set_input_files("#image-input", files)
        self.page.fill("#labels", labels)
        self.page.click("#classify")

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser):
    opened: list[Visit] = []

    def open_page(base: str, **context) -> Visit:
        opened.append(Visit(browser, base, **context))
        return opened[-1]

    yield open_page
    for v in opened:
        v.close()
        assert v.elsewhere() == [], "the page must talk to its own server only"


def rows(page) -> list[tuple[str, float]]:
    """(label, percent) of every .result-row, as shown."""
    shown = page.eval_on_selector_all("#results .result-row", """rows => rows.map(r => [
        r.querySelector(".label").textContent, r.querySelector(".pct").textContent])""")
    return [(label, 0.0 if pct == "<0.01%" else float(pct.rstrip("%"))) for label, pct in shown]


def histogram_counts(section) -> list[str]:
    """The numbers over a routing layer's histogram columns, as shown."""
    return section.locator(".hist-col .hist-count").all_inner_texts()


def expected_counts(layer: dict) -> list[str]:
    """What that histogram shows for an API routing layer: tokens per expert, then the dropped
    ones as a last column when there are any."""
    return [str(n) for n in layer["tokens_per_expert"]] + ([str(layer["dropped"])] if layer["dropped"] else [])


def api_classify(base: str, image: bytes, labels: list[str], key: str | None = None, **extra) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(f"{base}/v1/classify", json={"images": [base64.b64encode(image).decode()], "labels": labels,
                                                "explain": True, **extra}, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_page_and_assets_need_no_key_and_post_root_stays_huggingface(servers):
    keyed, open_ = servers["keyed"], servers["open"]
    page = httpx.get(keyed + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.head(keyed + "/").status_code == 200
    for asset, kind in [("/web/app.js", "javascript"), ("/web/style.css", "text/css"),
                        ("/web/samples/samples.json", "application/json"), ("/web/samples/sun.png", "image/png")]:
        r = httpx.get(keyed + asset)
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
    hf = {"inputs": base64.b64encode((SAMPLES / "sun.png").read_bytes()).decode(),
          "parameters": {"candidate_labels": ["sun", "fish"]}}
    assert httpx.post(keyed + "/", json=hf).status_code == 401  # the API still needs the key
    assert httpx.get(keyed + "/v1/models").status_code == 401
    answer = httpx.post(open_ + "/", json=hf, timeout=30)
    assert answer.status_code == 200 and {x["label"] for x in answer.json()} == {"sun", "fish"}
    samples = json.loads((SAMPLES / "samples.json").read_text())
    assert 6 <= len(samples) <= 8 and all((SAMPLES / s["file"]).is_file() for s in samples)


def test_upload_shows_sorted_scores_and_one_routing_layer_per_moe_layer(servers, visit):
    base = servers["open"]
    v = visit(base)
    page = v.page
    model = httpx.get(base + "/v1/models").json()["models"][0]
    page.wait_for_selector(f"#model-info dd:has-text('limoe-small v{model['version']}')")
    info = page.inner_text("#model-info")
    assert model["backend"] in info and model["device"] in info
    assert page.is_hidden("#auth")  # no keys on this server: no key field

    image = (SAMPLES / "rocket.png").read_bytes()
    labels = ["fire", "rocket", "sun", "house"]
    v.classify(str(SAMPLES / "rocket.png"), ", ".join(labels))
    page.wait_for_selector("#results .result-row")

    expected = api_classify(base, image, labels)
    shown = rows(page)
    assert [label for label, _ in shown] == [x["label"] for x in expected["results"][0]["labels"]]
    assert [pct for _, pct in shown] == sorted((pct for _, pct in shown), reverse=True)
    for (_, pct), x in zip(shown, expected["results"][0]["labels"]):
        assert pct == pytest.approx(x["score"] * 100, abs=0.06)
    assert page.inner_text("#results .timing").endswith(" ms")
    assert "classified in" in page.inner_text("#status")

    layers = page.locator("#routing .routing-layer")
    assert layers.count() == len(model["manifest"]["moe"]["layers"]) == 3
    routing = expected["results"][0]["routing"]
    for m, layer in enumerate(routing["layers"]):
        section = layers.nth(m)
        assert section.locator("canvas.patch-map").count() == 1
        assert histogram_counts(section) == expected_counts(layer)
        assert section.locator(".prompt-row .prompt-label").all_inner_texts() == labels
    # limoe-small is served dropless: no patch to cross out, so no "Dropped" in the legend
    assert "dropless" in info and not any(layer["dropped"] for layer in routing["layers"])
    assert page.locator("#legend li").all_inner_texts() == [f"Expert {e}" for e in range(routing["num_experts"])]

    assert v.axe() == []
    v.screenshot("web-desktop.png")


def test_dropped_patches_are_crossed_out_and_counted(exported_capacity, visit):
    """An entry with capacity routing (a tiny one at factor 0.5, made for the tests) drops
    tokens: the page says how it routes, counts the dropped patches per layer and adds "Dropped"
    to the legend, as the API reports them."""
    _, _, entry, _ = exported_capacity
    with Server("web capacity", model=str(entry), spinning="false", threads=1) as server:
        server.wait_ready()
        v = visit(server.base)
        page = v.page
        page.wait_for_selector("#model-info dd:has-text('capacity factor 0.5 (full experts drop tokens)')")
        labels = ["fire", "rocket", "sun"]
        v.classify(str(SAMPLES / "rocket.png"), ", ".join(labels))
        page.wait_for_selector("#results .result-row")
        routing = api_classify(server.base, (SAMPLES / "rocket.png").read_bytes(), labels)["results"][0]["routing"]
        assert any(layer["dropped"] for layer in routing["layers"])
        layers = page.locator("#routing .routing-layer")
        assert layers.count() == len(routing["layers"])
        for m, layer in enumerate(routing["layers"]):
            assert histogram_counts(layers.nth(m)) == expected_counts(layer)
            assert f"patches; {layer['dropped']} dropped" in layers.nth(m).inner_text()
        assert page.locator("#legend li").all_inner_texts()[-1] == "Dropped"
        assert page.locator("#legend li").count() == routing["num_experts"] + 1
        assert page.is_hidden("#model-picker-field")  # one model: nothing to pick
        assert v.axe() == []


def test_the_model_picker_classifies_with_the_chosen_model(servers, visit):
    base = servers["open"]
    v = visit(base)
    page = v.page
    version = httpx.get(base + "/v1/models").json()["models"][0]["version"]  # the store's newest
    page.wait_for_selector(f"#model-info dd:has-text('limoe-small v{version}')")
    assert page.is_visible("#model-picker-field")
    options = page.eval_on_selector_all("#model-picker option", "os => os.map(o => [o.value, o.textContent])")
    assert options == [["limoe-small", "limoe-small (default)"], ["limoe-tiny", "limoe-tiny"]]
    page.select_option("#model-picker", "limoe-tiny")
    page.wait_for_selector("#model-info dd:has-text('limoe-tiny v1')")
    labels = ["fire", "rocket", "sun"]
    v.classify(str(SAMPLES / "rocket.png"), ", ".join(labels))
    page.wait_for_selector("#results .result-row")
    expected = api_classify(base, (SAMPLES / "rocket.png").read_bytes(), labels, model="limoe-tiny")
    assert expected["model"] == "limoe-tiny"
    shown = rows(page)
    assert [label for label, _ in shown] == [x["label"] for x in expected["results"][0]["labels"]]
    for (_, pct), x in zip(shown, expected["results"][0]["labels"]):
        assert pct == pytest.approx(x["score"] * 100, abs=0.06)
    tiny_layers = len(httpx.get(base + "/v1/models").json()["models"][1]["manifest"]["moe"]["layers"])
    assert page.locator("#routing .routing-layer").count() == tiny_layers
    assert v.axe() == []


def test_sample_gallery_on_a_phone(servers, visit):
    v = visit(servers["open"], **PHONE)
    page = v.page
    page.wait_for_selector("#samples .sample")
    samples = json.loads((SAMPLES / "samples.json").read_text())
    assert page.locator("#samples .sample").all_inner_texts() == [s["label"] for s in samples]
    page.locator("#samples .sample").nth(0).click()  # the gallery's labels are the default labels
    page.wait_for_selector("#routing .routing-layer")
    assert page.locator("#results .result-row").count() == len(samples)
    assert rows(page)[0][0] == samples[0]["label"]  # the shipped model gets this one right
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
    assert v.axe() == []
    v.screenshot("web-phone.png")


def test_oversized_image_is_explained(servers, visit):
    v = visit(servers["open"])
    v.page.click("#classify")  # nothing chosen yet: said too, not sent
    assert v.page.inner_text("#error") == "No image: choose an image first, or click a sample."
    big = noise_png(200)
    assert len(big) > IMAGE_LIMIT
    v.classify({"name": "big.png", "mimeType": "image/png", "buffer": big}, "sun, fish")
    error = v.page.locator("#error")
    error.wait_for(state="visible")
    text = error.inner_text()
    assert text.startswith("413 Too large:")
    assert f"the image is {len(big)} bytes; the limit is {IMAGE_LIMIT}" in text and "image_too_large" in text
    assert v.page.locator("#results .result-row").count() == 0


def test_dropped_and_pasted_images_are_classified_together(servers, visit):
    v = visit(servers["open"])
    page = v.page
    page.wait_for_selector("#label-chips li")
    page.evaluate("""async () => {
        const blob = await (await fetch("/web/samples/pizza.png")).blob();
        const files = (name) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([blob], name, {type: "image/png"}));
            return transfer;
        };
        const event = {bubbles: true, cancelable: true};
        document.dispatchEvent(new DragEvent("drop", {...event, dataTransfer: files("dropped.png")}));
        document.dispatchEvent(new ClipboardEvent("paste", {...event, clipboardData: files("pasted.png")}));
    }""")
    assert page.locator("#selection .thumb-name").all_inner_texts() == ["dropped.png", "pasted.png"]
    page.set_input_files("#image-input", {"name": "big.png", "mimeType": "image/png", "buffer": noise_png(200)})
    page.click("#classify")
    page.wait_for_selector("#results .result-card")
    cards = page.locator("#results .result-card")
    assert cards.locator("h3").all_inner_texts() == ["dropped.png", "pasted.png", "big.png"]
    assert cards.nth(2).locator(".result-row").count() == 0  # one image too large: said in its own card
    assert "image_too_large" in cards.nth(2).inner_text()
    samples = json.loads((SAMPLES / "samples.json").read_text())
    assert cards.nth(0).locator(".result-row").count() == cards.nth(1).locator(".result-row").count() == len(samples)
    assert "(1 failed)" in page.inner_text("#status")
    picker = page.locator("#routing-image")  # the routing of which classified image
    assert picker.locator("option").all_inner_texts() == ["dropped.png", "pasted.png"]
    picker.select_option(label="pasted.png")
    assert page.locator("#routing .routing-layer").count() == 3


def test_api_key_is_asked_for_then_used(servers, visit):
    base = servers["keyed"]
    v = visit(base)
    page = v.page
    page.wait_for_selector("#api-key", state="visible")  # /v1/models answered 401: the page asks for a key
    v.classify(str(SAMPLES / "sun.png"), "sun, fish")
    page.wait_for_selector("#error:has-text('401')")
    assert "API key" in page.inner_text("#error") and "Authorization: Bearer" in page.inner_text("#error")
    assert page.locator("#results .result-row").count() == 0
    assert v.axe() == []  # with the key field and an error showing

    page.fill("#api-key", KEY)
    page.click("#auth button[type=submit]")
    page.wait_for_selector("#model-info dd:has-text('limoe-tiny v1')")
    templates = ["an emoji of {}.", "{}"]
    page.click("details.templates summary")
    page.fill("#templates", "\n".join(templates))
    page.click("#classify")
    page.wait_for_selector("#results .result-row")
    assert page.inner_text("#error") == ""
    expected = api_classify(base, (SAMPLES / "sun.png").read_bytes(), ["sun", "fish"], key=KEY, templates=templates)
    assert [label for label, _ in rows(page)] == [x["label"] for x in expected["results"][0]["labels"]]
    model = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["models"][0]
    assert page.locator("#routing .routing-layer").count() == len(model["manifest"]["moe"]["layers"]) == 1
    assert v.axe() == []
