"""The circuit viewer (circuitlab.viewer): the graph document and its circuit-tracer export, bad input,
the CLI, and the page itself in headless Chromium on the planted model's circuit-map + edge-attribution
runs (planted path visible, the threshold slider removes weak edges, the planted neuron's card holds
the run's numbers, no console errors, phone width, screenshots as artifacts)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from circuitlab.viewer import (ViewerError, build_graph, build_page, read_graph, to_circuit_tracer, validate_graph,
    write_graph)
from circuitlab.viewer.cli import view
from circuitlab.viewer.serve import page_server

ROOT = Path(__file__).resolve().parents[1]
PLANTED_PATH = [("embed", "a1.g2.k"), ("embed", "a1.g2.v"), ("a1.h2", "m2"), ("m2", "logits")]
NEURON = "m2.n37"  # circuitlab.models.planted.PLANTED_NEURON = (2, 37)
CARD_MEASURES = ("patch_effect", "atp_estimate", "direction_attribution", "logit_attribution")


@pytest.fixture(scope="module")
def runs(planted, tmp_path_factory):
    """A planted-model circuit-map run and edge-attribution run, saved as run folders (small settings)."""
    from circuitlab import ActivationStore
    from circuitlab.experiments import get
    from circuitlab.models.planted import planted_prompts

    harmful, harmless = planted_prompts(8)
    root = tmp_path_factory.mktemp("viewer_runs")
    store = ActivationStore(memory=True, disk=False)  # hermetic: nothing read from or left in the user cache
    cmap = get("circuit-map")(n_neurons=2, n_heads=2, n_atp_neurons=1, n_atp_heads=1, n_verify=2, direction_screen=2,
                              direction_finalists=1).run(planted, harmful, harmless, store=store)
    edges = get("edge-attribution")(n_pairs=6, n_boot=0, random_seeds=1, ig_steps=2,
                                    fractions=[0.02, 0.05, 0.1, 0.2, 0.5, 1.0]).run(planted, harmful, harmless)
    return cmap.save(root / "circuit"), edges.save(root / "edge_attribution")


@pytest.fixture(scope="module")
def doc(runs):
    return build_graph(*runs)


@pytest.fixture(scope="module")
def page(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer_page") / "circuit.html"
    assert view(str(runs[0]), str(out), None, edges=str(runs[1])) == 0
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    where = os.environ.get("CIRCUITLAB_TEST_ARTIFACTS")
    path = Path(where) if where else tmp_path_factory.mktemp("viewer_artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---- the graph document and its exports ------------------------------------------------------

def test_graph_document_round_trips(doc, tmp_path):
    again = read_graph(write_graph(doc, tmp_path / "g.json"))
    assert again == json.loads(json.dumps(doc)) and again["schema_version"] == 1
    assert doc["architecture"] == {"n_layers": 3, "n_heads": 4, "n_kv_heads": 4, "group_size": 1}
    assert [s["id"] for s in doc["edge_sets"]] == ["circuit-map:eap-ig", "edge-attribution:eap", "edge-attribution:eap-ig"]
    circuit = {(w, r) for w, r, _, _ in doc["edge_sets"][0]["edges"]}
    assert set(PLANTED_PATH) <= circuit
    broken = json.loads(json.dumps(doc))
    broken["edge_sets"][0]["edges"][0][1] = "a9.h0.q"
    with pytest.raises(ValueError, match="unknown node or reader"):
        validate_graph(broken)


def test_rebuilt_curve_circuits_have_the_curve_sizes(doc, runs):
    """Each edge's entry point comes from pruning top-n circuits again: the sizes must be the curve's own."""
    curve = pd.read_csv(runs[1] / "curve.csv")
    for s in doc["edge_sets"][1:]:
        method = s["id"].split(":")[1]
        sizes = list(curve[curve.method == method].sort_values("fraction").n_edges)
        rebuilt = [sum(1 for e in s["edges"] if e[3] is not None and e[3] <= i) for i in range(len(sizes))]
        exact = [i for i, p in enumerate(s["curve"]) if not p["tied_cut"]]  # the planted model has many 0 scores
        assert len(exact) >= 3 and [rebuilt[i] for i in exact] == [sizes[i] for i in exact] and s["complete"]


def test_circuit_tracer_export_shape(doc):
    ct = to_circuit_tracer(doc)
    assert set(ct) == {"metadata", "qParams", "nodes", "links"}
    assert {"slug", "scan", "prompt_tokens", "prompt", "schema_version"} <= set(ct["metadata"])
    ids = {n["node_id"]: n for n in ct["nodes"]}
    assert len(ids) == len(ct["nodes"])
    for n in ct["nodes"]:
        assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"} <= set(n)
    assert ids["E_0_0"]["feature_type"] == "embedding"
    logit = [n for n in ct["nodes"] if n["feature_type"] == "logit"]
    assert len(logit) == 1 and logit[0]["is_target_logit"] and logit[0]["layer"] == "4"
    assert all(link["source"] in ids and link["target"] in ids for link in ct["links"])
    # a head's q, k and v edges from one writer are one link: embed -> head 1.2 sums the planted k and v edges
    scores = {(w, r): s for w, r, s, _ in doc["edge_sets"][0]["edges"]}
    expected = sum(scores.get(("embed", f"a1.{x}"), 0.0) for x in ("h2.q", "g2.k", "g2.v"))
    head = "1_2_0"
    weight = [l["weight"] for l in ct["links"] if l["source"] == "E_0_0" and l["target"] == head]
    assert weight == [pytest.approx(expected)] and "L1H2" in ids[head]["clerp"]


def test_bad_input_is_one_line(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ViewerError, match="not a circuit run") as err:
        view(str(empty), None, None)
    assert "\n" not in str(err.value)
    old = shutil.copytree(runs[0], tmp_path / "old")  # the table circuit-map wrote before its edge stage
    table = pd.read_parquet(old / "table.parquet").drop(columns=["stage_rule", "edge_node", "in_edge_circuit"])
    table.to_parquet(old / "table.parquet")
    with pytest.raises(ViewerError, match="older format") as err:
        view(str(old), None, None)
    assert "\n" not in str(err.value) and "stage_rule" in str(err.value)
    missing = shutil.copytree(runs[0], tmp_path / "missing")
    (missing / "circuit_edges.csv").unlink()
    with pytest.raises(ViewerError, match="no circuit_edges table") as err:
        view(str(missing), None, None)
    assert "\n" not in str(err.value)


def test_cli_exit_codes(runs, tmp_path):
    code = "import sys; from circuitlab.viewer.cli import main; sys.exit(main(sys.argv[1:]))"
    bad = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.strip().splitlines()) == 1
    out = tmp_path / "p.html"
    ok = subprocess.run([sys.executable, "-c", code, str(runs[0]), "--out", str(out), "--json"], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert out.is_file() and (tmp_path / "p.graph.json").is_file()
    assert (tmp_path / "p.circuit-map.eap-ig.circuit-tracer.json").is_file()


def test_import_loads_neither_torch_nor_pandas():
    code = "import sys, circuitlab.viewer.cli; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_page_data_cannot_end_its_script_element(doc):
    hostile = json.loads(json.dumps(doc))
    hostile["title"] = "</script><!--<script>"
    text = build_page(hostile)
    assert text.count("</script>") == 2 and "<!--" not in text  # the data block's and the code's own
    data = text.split('<script id="graph-data" type="application/json">', 1)[1].split("</script>", 1)[0]
    assert json.loads(data)["title"] == hostile["title"]


def test_page_is_self_contained_and_served_on_localhost_only(page):
    text = page.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text)  # nothing fetched at view time
    assert "default-src 'none'" in text
    server = page_server(page, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert server.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/", timeout=10) as r:
            assert r.read() == page.read_bytes()
    finally:
        server.shutdown()
        server.server_close()


def test_committed_demo_page_is_current():
    """results/refusal_circuit/circuit.html is the page of the committed runs, built by this code."""
    committed = ROOT / "results/refusal_circuit/circuit.html"
    doc = build_graph(ROOT / "results/refusal_circuit/circuit", ROOT / "results/refusal_edges/edge_attribution")
    assert committed.read_text(encoding="utf-8") == build_page(doc), \
        ("regenerate: python -m circuitlab.viewer.cli results/refusal_circuit/circuit "
                                                     "--edges results/refusal_edges/edge_attribution")


# ---- the page in headless Chromium -------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("no browser driver: selenium is not installed (run .ci/install-browser.sh)")
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser") if shutil.which(b)), None)
    driver_bin = shutil.which("chromedriver")
    if not binary or not driver_bin:
        pytest.skip("no browser: Debian's chromium and chromium-driver are not installed (run .ci/install-browser.sh)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="viewer-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(browser, page, width=1280, height=800, mobile=False):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    browser.get(page.as_uri())
    WebDriverWait(browser, 15).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")


def _css(browser, selector):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def _no_console_errors(browser):
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors


def _unit_row(run_dir, kind, layer, index):
    t = pd.read_parquet(run_dir / "table.parquet")
    col = "neuron" if kind == "neuron" else "head"
    row = t[(t.component == kind) & (t.layer == layer) & (t[col] == index)]
    assert len(row) == 1
    return row.iloc[0]


def _check_card(browser, row):
    for key in CARD_MEASURES:
        cell = _css(browser, f'#card td[data-key="{key}"]')[0]
        assert float(cell.get_attribute("data-value")) == pytest.approx(float(row[key]), rel=1e-12, abs=1e-15)
        assert float(cell.text) == pytest.approx(float(row[key]), rel=1e-3)  # as shown: 4 significant digits
    assert _css(browser, '#card td[data-key="stage"]')[0].text == row.stage


def test_planted_path_is_visible(browser, page, doc):
    _open(browser, page)
    for node in ("embed", "a1.h2", "m2", "logits"):
        assert _css(browser, f'g.node[data-node="{node}"]')[0].is_displayed()
    assert _css(browser, f'g.node[data-unit="{NEURON}"]')[0].is_displayed()
    for w, r in PLANTED_PATH:
        edge = _css(browser, f'#edges path.edge[data-writer="{w}"][data-reader="{r}"]')
        assert edge and edge[0].is_displayed(), (w, r)
    assert len(_css(browser, "#edges path.edge")) == len(doc["edge_sets"][0]["edges"])
    _no_console_errors(browser)


def test_threshold_slider_removes_weak_edges(browser, page, doc):
    from selenium.webdriver.common.keys import Keys

    _open(browser, page)
    before = len(_css(browser, "#edges path.edge"))
    slider = _css(browser, "#threshold")[0]
    slider.click()  # a click in the middle of the track: about half-way up the log |score| scale
    shown = [abs(float(e.get_attribute("data-score"))) for e in _css(browser, "#edges path.edge")]
    weakest_shown = min(shown)
    hidden = sorted(abs(e[2]) for e in doc["edge_sets"][0]["edges"])[:before - len(shown)]
    assert 0 < len(shown) < before and max(hidden) <= weakest_shown  # exactly the weak ones went
    for w, r in PLANTED_PATH:  # the planted path is the strong part of the circuit
        assert _css(browser, f'#edges path.edge[data-writer="{w}"][data-reader="{r}"]')
    slider.send_keys(Keys.HOME)  # keyboard: back to every edge
    assert len(_css(browser, "#edges path.edge")) == before
    _no_console_errors(browser)


def test_clicking_the_planted_neuron_opens_its_card(browser, page, runs, artifacts):
    _open(browser, page)
    _css(browser, f'g.node[data-unit="{NEURON}"]')[0].click()
    card = _css(browser, "#card")[0]
    assert card.get_attribute("data-target") == NEURON and "L2 neuron 37" in _css(browser, "#card-title")[0].text
    row = _unit_row(runs[0], "neuron", 2, 37)
    _check_card(browser, row)
    assert "graph rule" in _css(browser, '#card td[data-key="stage_rule"]')[0].text and row.stage_rule == "graph"
    assert "logits" in card.text  # its strongest out-edge
    shot = artifacts / "viewer_planted_1280x800.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    _no_console_errors(browser)


def test_keyboard_opens_the_planted_head_card(browser, page, runs):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _open(browser, page)
    head = _css(browser, 'g.node[data-node="a1.h2"]')[0]
    assert head.get_attribute("tabindex") == "0" and "attention head 2, layer 1" in head.get_attribute("aria-label")
    browser.execute_script("arguments[0].focus()", head)
    ActionChains(browser).send_keys(Keys.ENTER).perform()
    assert _css(browser, "#card")[0].get_attribute("data-target") == "a1.h2"
    assert browser.execute_script("return document.activeElement.id") == "card"  # focus follows to the card
    _check_card(browser, _unit_row(runs[0], "head", 1, 2))
    _no_console_errors(browser)


def test_method_toggle_and_keep_faithfulness(browser, page, runs, doc):
    from selenium.webdriver.common.keys import Keys

    _open(browser, page)
    _css(browser, "#set-2")[0].click()  # EAP-IG top-n from the edge-attribution run
    ig = doc["edge_sets"][2]
    assert ig["label"] in _css(browser, "#status")[0].text
    assert len(_css(browser, "#edges path.edge")) == len(ig["edges"])
    faith = _css(browser, "#faith")[0]
    faith.send_keys(Keys.HOME + Keys.ARROW_RIGHT * 90)  # keep faithfulness >= 0.90
    curve = pd.read_csv(runs[1] / "curve.csv")
    curve = curve[curve.method == "eap-ig"].sort_values("fraction")
    first = int((curve.faithfulness >= 0.9).to_numpy().argmax())  # the smallest measured circuit reaching 0.9
    assert not ig["curve"][first]["tied_cut"], "pick a point whose cut is not a tie: its size is then exact"
    smallest = int(curve.n_edges.iloc[first])
    assert len(_css(browser, "#edges path.edge")) == smallest
    assert f"{smallest} edges" in _css(browser, "#status")[0].text
    assert len(_css(browser, "#cpr-cmd tr")) == 1 + len(doc["edge_sets"]) + 1  # header, every set, random
    _no_console_errors(browser)


def test_phone_width_has_no_horizontal_overflow(browser, page, artifacts):
    _open(browser, page, 390, 844, mobile=True)
    width = browser.execute_script("return window.innerWidth")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    boxes = browser.execute_script("return Array.from(document.querySelectorAll('#controls *')).map(function (e) {"
                                   " var r = e.getBoundingClientRect(); return [e.id || e.tagName, r.left, r.right]; })")
    outside = [b for b in boxes if b[1] < -0.5 or b[2] > width + 0.5]
    assert not outside, outside
    shot = artifacts / "viewer_planted_390.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 5_000
    _no_console_errors(browser)
