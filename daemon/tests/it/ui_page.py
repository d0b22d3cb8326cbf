"""Drives the usage page in Debian's chromium (headless, through Playwright) and prints what a
user would read off it as JSON. Usage: ui_page.py URL SECRET DEVICE SHOTS_DIR

DEVICE is the device clicked (in the device table) to narrow the page."""

import json
import sys

from playwright.sync_api import sync_playwright

url, secret, device, shots = sys.argv[1:5]
out = {"console": [], "steps": {}}


def cards(page):
    return {
        k: int(page.get_attribute(f"#card-{k} b", "data-value"))
        for k in ("count", "total", "download", "upload")
    }


def loaded(page, before):
    """Waits for a load after `before` to finish."""
    page.wait_for_function(
        "n => Number(document.body.dataset.loaded || 0) > n", arg=before, timeout=15000
    )
    return int(page.evaluate("document.body.dataset.loaded"))


def shot(page, name):
    page.screenshot(path=f"{shots}/{name}.png", full_page=True)


with sync_playwright() as p:
    browser = p.chromium.launch(
        executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
    )
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on(
        "console",
        lambda m: out["console"].append(m.text) if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda e: out["console"].append(str(e)))

    page.goto(url)
    page.wait_for_selector("#login:not([hidden])")
    shot(page, "1-login")
    page.fill("#secret", "wrong")
    page.click("#login button")
    page.wait_for_function("document.querySelector('#login-error').textContent !== ''")
    out["steps"]["wrong_secret"] = page.text_content("#login-error")
    out["console"].clear()  # the refused request is the browser's own 401 line
    page.fill("#secret", secret)
    page.click("#login button")
    n = loaded(page, 0)
    out["steps"]["cards"] = cards(page)
    out["steps"]["card_text"] = page.text_content("#card-total small")
    out["steps"]["bars_device"] = page.eval_on_selector_all(
        "#bars g[data-key]", "gs => gs.map(g => g.dataset.key)"
    )
    out["steps"]["devices_table"] = page.eval_on_selector_all(
        "#devices tbody tr", "rs => rs.map(r => r.dataset.device)"
    )
    out["steps"]["hour_points"] = int(page.get_attribute("#series", "data-points"))
    shot(page, "2-page")

    page.select_option("#group", "host")
    n = loaded(page, n)
    out["steps"]["bars_host"] = page.eval_on_selector_all(
        "#bars g[data-key]", "gs => gs.map(g => g.dataset.key)"
    )
    page.select_option("#range", "1h")
    n = loaded(page, n)
    page.select_option("#interval", "minute")
    n = loaded(page, n)
    out["steps"]["series_interval"] = page.get_attribute("#series", "data-interval")
    out["steps"]["minute_points"] = int(page.get_attribute("#series", "data-points"))
    page.select_option("#metric", "connections")
    n = loaded(page, n)
    out["steps"]["series_flows"] = page.eval_on_selector_all(
        "#series rect title", "ts => ts.map(t => t.textContent)"
    )
    shot(page, "3-hosts-minutes")

    page.click(f"#devices tbody tr[data-device='{device}']")
    n = loaded(page, n)
    out["steps"]["filtered_cards"] = cards(page)
    out["steps"]["chips"] = page.eval_on_selector_all(
        "#filters .chip", "cs => cs.map(c => c.dataset.filter)"
    )
    page.select_option("#group", "device")
    n = loaded(page, n)
    out["steps"]["filtered_bars"] = page.eval_on_selector_all(
        "#bars g[data-key]", "gs => gs.map(g => g.dataset.key)"
    )
    shot(page, "4-device-filter")

    page.click("#theme")
    out["steps"]["theme"] = page.evaluate("document.documentElement.dataset.theme")
    shot(page, "5-theme")

    # The secret is kept: a new page in the same browser opens without asking.
    page2 = context.new_page()
    page2.set_viewport_size({"width": 390, "height": 844})
    page2.on("pageerror", lambda e: out["console"].append(str(e)))
    page2.goto(url)
    loaded(page2, 0)
    out["steps"]["reopened_cards"] = cards(page2)
    out["steps"]["phone_overflow"] = page2.evaluate(
        "document.documentElement.scrollWidth > window.innerWidth"
    )
    shot(page2, "6-phone")
    browser.close()

print(json.dumps(out))
