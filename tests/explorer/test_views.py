"""The explorer's views (explorer.js) in headless Chromium, through the self-contained HTML export opened
from a file path: the heatmap's cells, a hover against the `Probe` record, select and match on a planted
task, the gradient and attention views, a strict content-security policy; screenshots go to tmp_path."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from lightning_rnnviz.explorer.export import page
from tests.explorer.probe_sets import (
    ALWAYS_ON,
    DISTRACTOR,
    PARTNER,
    PLANTED_LENGTHS,
    PLANTED_UNIT,
    PLANTED_UNITS,
    TRAIN,
    VAL,
    lstm_blob,
    lstm_recordings,
    planted_blob,
)
from tests.helpers.browser import chromium, require_chromium, screenshot

WINDOW = (1400, 1000)


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    """The export page over two runs: "lstm" (real records: training at steps 5 and 10, validation at 10)
    and "planted" (validation at step 7); opened in one browser for the module."""
    paths = require_chromium()
    ids, tokens, recordings = lstm_recordings()
    blobs = {}
    for step, source, rec in recordings:
        blobs[("lstm", TRAIN if source == "training" else VAL, step)] = lstm_blob(rec, tokens, step, source)
    planted, truth = planted_blob()
    blobs[("planted", VAL, 7)] = planted
    runs = {"runs": [
        {"run": "lstm", "tags": {TRAIN: {"steps": [5, 10], "sizes": [len(blobs[("lstm", TRAIN, s)]) for s in (5, 10)]},
                                 VAL: {"steps": [10], "sizes": [len(blobs[("lstm", VAL, 10)])]}}},
        {"run": "planted", "tags": {VAL: {"steps": [7], "sizes": [len(planted)]}}}]}
    folder = tmp_path_factory.mktemp("explorer")
    html = folder / "explorer.html"
    html.write_text(page(runs, blobs, title="test </script> explorer"), encoding="utf-8")
    with chromium(paths, window_size=WINDOW) as driver:
        yield {"driver": driver, "url": html.as_uri(), "tokens": tokens, "recordings": recordings, "truth": truth,
               "html": html}


def open_page(driver, url):
    driver.get("about:blank")
    driver.get(url)
    wait(driver, "return document.body.dataset.rnnvizReady === '1'", "the explorer's first probe set")


def wait(driver, script, what, *args, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.05)
    status = driver.execute_script("const s = document.getElementById('rnnviz-status'); return s && s.textContent;")
    raise AssertionError(f"timed out waiting for {what}; status: {status!r}")


def choose(driver, select_id, value):
    """Set a <select> or <input> as a person would (its change/input event fires)."""
    driver.execute_script("""
        const e = document.getElementById(arguments[0]); e.value = arguments[1];
        e.dispatchEvent(new Event(e.tagName === 'SELECT' ? 'change' : 'input'));""", select_id, str(value))
    time.sleep(0.2)


def cell_offset(driver, row, step):
    """The offset, from the heatmap canvas's centre (selenium 4's origin), of the centre of a cell."""
    d = driver.execute_script("const c = document.getElementById('rnnviz-heatmap'); "
                              "return Object.assign({w: c.getBoundingClientRect().width, "
                              "h: c.getBoundingClientRect().height}, c.dataset);")
    x = int(d["left"]) + step * int(d["cellWidth"]) + int(d["cellWidth"]) / 2 - d["w"] / 2
    y = int(d["top"]) + row * int(d["cellHeight"]) + int(d["cellHeight"]) / 2 - d["h"] / 2
    return int(round(x)), int(round(y))


def hover(driver, row, step):
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "rnnviz-heatmap")
    ActionChains(driver).move_to_element_with_offset(canvas, *cell_offset(driver, row, step)).perform()
    return wait(driver, "const t = document.getElementById('rnnviz-tooltip'); "
                "return !t.hidden && t.dataset.unit !== undefined && Object.assign({}, t.dataset);", "the tooltip")


def drag(driver, row, start, end):
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = driver.find_element("id", "rnnviz-heatmap")
    x0, y0 = cell_offset(driver, row, start)
    x1, _ = cell_offset(driver, row, end)
    (ActionChains(driver).move_to_element_with_offset(canvas, x0, y0).click_and_hold()
     .move_to_element_with_offset(canvas, (x0 + x1) // 2, y0).move_to_element_with_offset(canvas, x1, y0)
     .release().perform())
    time.sleep(0.2)


def selected_units(driver):
    return driver.execute_script("return Array.from(document.querySelectorAll('#rnnviz-selected li[data-unit]'))"
                                 ".map(li => Number(li.dataset.unit));")


def matches(driver):
    return driver.execute_script("return Array.from(document.querySelectorAll('#rnnviz-matches li'))"
                                 ".map(li => [Number(li.dataset.sequence), Number(li.dataset.start), "
                                 "Number(li.dataset.end), Number(li.dataset.score)]);")


def show(driver, element_id, path):
    driver.execute_script("document.getElementById(arguments[0]).scrollIntoView({block: 'start'});", element_id)
    time.sleep(0.1)
    width, height = screenshot(driver, path)
    assert width >= 1000 and height >= 700, (width, height)


# -------------------------------------------------------------------------------------------- tests
def test_heatmap_cells_and_hover_show_the_probe_record(explorer, tmp_path):
    driver = explorer["driver"]
    open_page(driver, explorer["url"])
    assert driver.title == "test </script> explorer"
    state = driver.execute_script("return ['rnnviz-run', 'rnnviz-tag', 'rnnviz-step'].map("
                                  "i => document.getElementById(i).value).concat("
                                  "[document.getElementById('rnnviz-step').dataset.step]);")
    assert state == ["lstm", TRAIN, "1", "10"]  # the newest training recording first
    step, source, rec = explorer["recordings"][1]
    hidden = rec["lstm"].hidden.numpy()  # (layers, batch, T, units)
    choose(driver, "rnnviz-layer", 1)
    choose(driver, "rnnviz-sequence", 2)
    canvas = driver.execute_script("return Object.assign({}, document.getElementById('rnnviz-heatmap').dataset);")
    assert (int(canvas["units"]), int(canvas["steps"])) == (hidden.shape[3], hidden.shape[2])
    for unit, t in [(0, 0), (7, 5), (9, 11)]:
        tip = hover(driver, unit, t)  # sorted by index: row == unit
        assert (int(tip["unit"]), int(tip["step"]), tip["token"]) == (unit, t, explorer["tokens"][2][t])
        assert np.float32(float(tip["value"])) == hidden[1, 2, t, unit]
        assert float(tip["value"]) == float(hidden[1, 2, t, unit])  # exactly the stored float32
    screenshot(driver, tmp_path / "hidden.png")

    # a gate instead of h_t: the record's gate activation
    assert driver.execute_script("return Array.from(document.querySelectorAll('#rnnviz-quantity option'))"
                                 ".map(o => o.value);") == ["hidden", "input", "forget", "cell", "output"]
    choose(driver, "rnnviz-quantity", "forget")
    tip = hover(driver, 3, 8)
    assert float(tip["value"]) == float(rec["lstm"].gates["forget"][1, 2, 8, 3])
    choose(driver, "rnnviz-quantity", "hidden")

    # sorted by variance over the probe set's steps: the order Python computes
    choose(driver, "rnnviz-sort", "variance")
    order = json.loads(driver.execute_script("return document.getElementById('rnnviz-heatmap').dataset.order;"))
    variance = hidden[1].reshape(-1, hidden.shape[3]).astype(np.float64).var(axis=0)
    assert order == sorted(range(hidden.shape[3]), key=lambda u: (-variance[u], u))
    tip = hover(driver, 0, 3)
    assert int(tip["unit"]) == order[0] and float(tip["value"]) == float(hidden[1, 2, 3, order[0]])

    # the slider goes back to the first training recording: its record's values
    choose(driver, "rnnviz-sort", "index")
    choose(driver, "rnnviz-step", 0)
    wait(driver, "return document.getElementById('rnnviz-step').dataset.step === '5'", "step 5")
    first = explorer["recordings"][0][2]["lstm"].hidden.numpy()
    tip = hover(driver, 4, 6)
    assert float(tip["value"]) == float(first[1, 2, 6, 4]) != float(hidden[1, 2, 6, 4])


def test_select_and_match_the_planted_unit(explorer, tmp_path):
    driver = explorer["driver"]
    open_page(driver, explorer["url"])
    choose(driver, "rnnviz-run", "planted")
    wait(driver, "return document.getElementById('rnnviz-heatmap').dataset.units === '6'", "the planted heatmap")
    text = driver.find_element("css selector", ".rnnviz").text
    assert "no gates to show" in text and "6 of 16 units" in text
    assert "No gradients" in driver.find_element("id", "rnnviz-gradient-view").text
    assert "No attention module" in driver.find_element("id", "rnnviz-attention").text
    choose(driver, "rnnviz-threshold", "0.5")
    truth = explorer["truth"]
    (k0, x0) = truth["x_steps"][0]
    assert k0 == 0
    drag(driver, PLANTED_UNITS.index(PLANTED_UNIT), x0, x0)  # the planted token "X" alone
    assert selected_units(driver) == [PLANTED_UNIT, PARTNER]  # not the distractor, nor the unit always on
    found = matches(driver)  # where both are on together: every "X", never "W" (the partner alone)
    assert sorted((k, s, e) for k, s, e, _ in found) == sorted((k, t, t) for k, t in truth["x_steps"])
    assert all(abs(score - np.float32(0.875)) < 1e-6 for *_, score in found)
    choose(driver, "rnnviz-sort", "activity")  # the mean over the selected step: 0.9, 0.85, 0.8, 0.7, then noise
    order = json.loads(driver.execute_script("return document.getElementById('rnnviz-heatmap').dataset.order;"))
    assert order[:4] == [PLANTED_UNIT, PARTNER, DISTRACTOR, ALWAYS_ON]
    choose(driver, "rnnviz-sort", "index")
    show(driver, "rnnviz-hidden-view", tmp_path / "select_match.png")
    # a match in another sequence, clicked: that sequence is shown, the selection and its matches stay
    driver.find_element("css selector", "#rnnviz-matches li[data-sequence='1']").click()
    time.sleep(0.2)
    assert driver.find_element("id", "rnnviz-sequence").get_attribute("value") == "1"
    assert selected_units(driver) == [PLANTED_UNIT, PARTNER] and len(matches(driver)) == len(found)
    show(driver, "rnnviz-hidden-view", tmp_path / "match_clicked.png")
    choose(driver, "rnnviz-sequence", 0)

    # the step before X and X: the distractor (on there, off before); matched wherever it fires
    drag(driver, 0, x0 - 1, x0)
    assert selected_units(driver) == [DISTRACTOR]
    found = matches(driver)
    assert sorted((k, s, e) for k, s, e, _ in found) == sorted(truth["distractor_runs"])
    assert all(e < PLANTED_LENGTHS[k] for k, _, e, _ in found)
    # ranked as documented: closest in length to the selection (2 steps), then the larger mean value
    assert found == sorted(found, key=lambda m: (abs(m[2] - m[1] + 1 - 2), -m[3], m[0], m[1]))

    # a threshold above every value: nothing is on
    choose(driver, "rnnviz-threshold", "0.95")
    assert selected_units(driver) == [] and matches(driver) == []
    choose(driver, "rnnviz-threshold", "0.75")
    assert selected_units(driver) == [DISTRACTOR]  # 0.8 > 0.75; the unit always on (0.7) never is
    assert ALWAYS_ON not in selected_units(driver)


def test_gradients_one_path_per_sequence_on_a_log_axis(explorer, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    driver = explorer["driver"]
    open_page(driver, explorer["url"])
    rec = explorer["recordings"][1][2]["lstm"]
    norms = torch.linalg.vector_norm(rec.hidden_grad, dim=-1).numpy()  # (layers, batch, T)
    for layer in (0, 1):
        choose(driver, "rnnviz-layer", layer)
        paths = driver.execute_script("return Array.from(document.querySelectorAll('svg#rnnviz-gradients "
                                      "path[data-sequence]')).map(p => [Number(p.dataset.sequence), "
                                      "p.getAttribute('d').split('L').length]);")
        assert paths == [[k, norms.shape[2]] for k in range(norms.shape[1])]
        chart = driver.find_element("id", "rnnviz-gradients")
        assert chart.get_attribute("data-scale") == "log"
        ticks = [t.text for t in chart.find_elements("css selector", "text.rnnviz-tick")]
        assert len(ticks) >= 2 and all(t.startswith("1e") for t in ticks)
        width = float(chart.get_attribute("width"))
        ActionChains(driver).move_to_element_with_offset(chart, int(64 + (width - 80) * 4 / 11 - width / 2), 0).perform()
        readout = wait(driver, "return Object.assign({}, document.getElementById('rnnviz-gradient-readout')"
                       ".dataset);", "the gradient readout")
        assert int(readout["step"]) == 4
        assert np.array_equal(np.float32(json.loads(readout["values"])), norms[layer, :, 4])
    show(driver, "rnnviz-gradient-view", tmp_path / "gradients.png")

    # validation: no gradients of its own, the nearest training recording's, and it says so
    choose(driver, "rnnviz-tag", VAL)
    view = driver.find_element("id", "rnnviz-gradient-view").text
    assert "Validation has no gradients" in view and "step 10" in view
    assert len(driver.find_elements("css selector", "svg#rnnviz-gradients path[data-sequence]")) == norms.shape[1]
    show(driver, "rnnviz-gradient-view", tmp_path / "gradients_validation.png")


def test_attention_heads_and_hovering_a_query(explorer, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    driver = explorer["driver"]
    open_page(driver, explorer["url"])
    choose(driver, "rnnviz-sequence", 1)
    heads = driver.find_elements("css selector", "#rnnviz-attention canvas[data-head]")
    weights = explorer["recordings"][1][2]["attn"].attention.numpy()
    assert [h.get_attribute("data-head") for h in heads] == [str(i) for i in range(weights.shape[1])]
    assert all(h.get_attribute("data-queries") == h.get_attribute("data-keys") == "12" for h in heads)
    show(driver, "rnnviz-attention", tmp_path / "attention_before.png")
    head = heads[1]
    size = head.size
    c = (int(head.get_attribute("width")) - 60) // 12
    ActionChains(driver).move_to_element_with_offset(head, 0, int(56 + 3 * c + c / 2 - size["height"] / 2)).perform()
    assert wait(driver, "return arguments[0].dataset.query;", "the hovered query", head) == "3"
    text = driver.find_element("id", "rnnviz-attention").text
    top = int(np.argmax(weights[1, 1, 3]))
    token = explorer["tokens"][1]
    assert f'query 3 "{token[3]}": "{token[top]}"' in text
    screenshot(driver, tmp_path / "attention.png")


def test_strict_content_security_policy(explorer, tmp_path):
    """No inline style text: under style-src 'self' the page has no violations and its styles apply."""
    driver = explorer["driver"]
    html = explorer["html"].read_text(encoding="utf-8")
    policy = ("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
              "script-src 'unsafe-inline'; style-src 'self'\">\n<script>window.violations = [];"
              "document.addEventListener('securitypolicyviolation', e => window.violations.push("
              "e.violatedDirective + ' ' + e.sample));</script>")
    strict = tmp_path / "strict.html"
    strict.write_text(html.replace("<head>", "<head>\n" + policy, 1), encoding="utf-8")
    open_page(driver, strict.as_uri())
    hover(driver, 1, 1)
    choose(driver, "rnnviz-run", "planted")
    drag(driver, 3, 4, 4)
    assert driver.execute_script("return window.violations;") == []
    assert driver.execute_script("return getComputedStyle(document.getElementById('rnnviz-tooltip')).position;") \
        == "fixed"
    assert driver.execute_script("return document.getElementById('rnnviz-heatmap').style.width;").endswith("px")
