"""The run report (`server.report`, `fedpriv report`), read back in headless Chromium.

One tiny real run (digits, 3 nodes, 2 rounds, SecAgg+ with client-level noise, a budget
that makes every node decline round 2) feeds every test; Chromium (Debian's `chromium`,
installed by .ci/run) renders report.html and a probe script reports what it decoded.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from server.report import PLOT_FILES, RunReportError, load_run, participation, threat_model, write_run_report
from simulations.cli import main as fedpriv_main

pytestmark = pytest.mark.e2e  # one real simulated run feeds every test

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]

# Runs after every image has loaded (window 'load'); writes what the browser decoded and shows into the DOM.
PROBE = """<script>
window.addEventListener('load', () => {
  const out = {images: [], values: []};
  for (const img of document.querySelectorAll('img')) {
    out.images.push({id: img.id, complete: img.complete, naturalWidth: img.naturalWidth,
                     naturalHeight: img.naturalHeight, shownWidth: img.getBoundingClientRect().width});
  }
  for (const el of document.querySelectorAll('[data-key]')) {
    const row = el.closest('[data-node]');
    out.values.push({key: el.dataset.key, node: row ? row.dataset.node : null,
                     value: el.dataset.value, text: el.textContent.trim()});
  }
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _run_chromium(chromium: str, *args: str, profile: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report-run")
    out = root / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--dataset", "digits", "--clients", "3", "--rounds", "2",
         "--epsilon", "2", "--max-epsilon", "1.6", "--client-noise-multiplier", "0.5", "--clip-norm", "10",
         "--out", str(out), "--state-dir", str(root / "state")],
        capture_output=True, text=True, timeout=600, cwd=root,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def rendered(run_dir, chromium, tmp_path_factory) -> dict:
    """The probe's findings after Chromium loaded the report `fedpriv report` wrote."""
    work = tmp_path_factory.mktemp("chromium")
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    probed = work / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    dom = _run_chromium(chromium, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri(),
                        profile=work / "profile").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe script did not run: " + dom[-1000:]
    return json.loads(html.unescape(found.group(1)))


def _lookup(summary: dict, dotted: str):
    value = summary
    for part in dotted.split("."):
        value = value[part]
    return value


def _shown_matches(text: str, value) -> bool:
    """Whether the page's text is `value` as formatted for reading (rounded, '-' for none/empty)."""
    if value is None or value == []:
        return text in ("-", "none", "off")
    if isinstance(value, list):
        return [int(x) for x in text.split(",")] == value
    if isinstance(value, str):
        return text == value
    shown = float(text)
    decimals = len(text.split(".")[1]) if "." in text and "e" not in text else 0
    return math.isclose(shown, value, rel_tol=5e-4, abs_tol=0.51 * 10.0 ** -decimals if decimals else 0.0)


def test_every_run_writes_the_report_and_its_plots(run_dir):
    # Written by the ServerApp itself at the end of `fedpriv simulate`, not by the command below.
    assert (run_dir / "report.html").stat().st_size > 10_000
    for name in PLOT_FILES.values():
        assert (run_dir / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_command_rewrites_the_page_and_prints_its_path(run_dir, capsys):
    (run_dir / "report.html").unlink()
    assert fedpriv_main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    # Self-contained: each plot is embedded as the very PNG written to plots/, nothing is fetched.
    embedded = dict(re.findall(r'data-plot="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', page))
    assert set(embedded) == set(PLOT_FILES.values())
    for name, data in embedded.items():
        assert base64.b64decode(data) == (run_dir / "plots" / name).read_bytes()
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page


def test_chromium_decodes_every_plot(rendered):
    images = {img["id"]: img for img in rendered["images"]}
    assert set(images) == {"plot-accuracy", "plot-epsilon", "plot-participation", "plot-classes"}
    for img in images.values():
        assert img["complete"] and img["naturalWidth"] > 300 and img["naturalHeight"] > 100, img
        assert img["shownWidth"] > 300, img


def test_numbers_on_the_page_are_summary_json(run_dir, rendered):
    summary = json.loads((run_dir / "summary.json").read_text())
    shown = rendered["values"]
    keys = {(v["key"], v["node"]) for v in shown}
    for key in ("final.test_accuracy", "final.test_loss", "rounds_completed", "max_client_epsilon",
                "client_level.epsilon", "client_level.delta", "target_epsilon", "delta", "secure_rounds_failed"):
        assert (key, None) in keys, f"{key} is not on the page"
    for name in summary["clients"]:
        for key in ("epsilon", "delta", "max_epsilon", "declined_rounds", "failed_rounds"):
            assert (key, name) in keys, f"{name}'s {key} is not on the page"
    for item in shown:
        expected = summary["clients"][item["node"]][item["key"]] if item["node"] else _lookup(summary, item["key"])
        assert json.loads(item["value"]) == expected, item
        assert _shown_matches(item["text"], expected), item
    # What this run did: round 2 declined by every node, so its secure aggregation failed,
    # and the client-level epsilon of round 1's release is on the page.
    assert summary["secure_rounds_failed"] == [2] and summary["rounds_aggregated"] == 1
    assert all(c["declined_rounds"] == [2] and c["epsilon"] <= 1.6 for c in summary["clients"].values())
    client_eps = [v for v in shown if v["key"] == "client_level.epsilon"]
    assert client_eps and all(json.loads(v["value"]) == summary["client_level"]["epsilon"] > 0 for v in client_eps)


def test_screenshot_of_the_page_is_not_blank(run_dir, chromium, tmp_path):
    shot = tmp_path / "report.png"
    _run_chromium(chromium, "--window-size=1200,1600", f"--screenshot={shot}", (run_dir / "report.html").as_uri(),
                  profile=tmp_path / "profile")
    pixels = imread(shot)
    assert pixels.shape[:2] == (1600, 1200)
    # Plots and text make many distinct colours; a blank or error page has a handful.
    assert len(np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)) > 200


def test_participation_sorts_each_nodes_round(run_dir):
    grid = participation(load_run(run_dir))
    assert grid == {name: {1: "trained", 2: "declined"} for name in ("node-0", "node-1", "node-2")}


def test_threat_model_matches_the_run():
    secure = threat_model({"secure_aggregation": True, "dp": True})
    plain = threat_model({"secure_aggregation": False, "dp": False})
    assert secure.count(". ") == 3 and "only the sum" in secure and "(epsilon, delta)" in secure
    assert "secret entropy on its own machine" in secure and "no run-config, seed or round schedule" in secure
    assert plain.count(". ") == 2 and "in the clear" in plain and "Differential privacy was off" in plain
    assert "secret entropy" not in plain and all("refuses runs that break its owner's policy" in t for t in (secure, plain))


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("*.pt", "*.log", "*.stderr", "plots"))
    return target


def test_missing_file_is_named(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path)
    (copy / "ledger.json").unlink()
    (copy / "report.html").unlink()
    with pytest.raises(RunReportError, match=r"ledger\.json: missing"):
        write_run_report(copy)
    assert not (copy / "report.html").exists() and not (copy / "plots").exists()


def test_malformed_metrics_line_is_named(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path)
    lines = (copy / "metrics.jsonl").read_text().splitlines()
    (copy / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    with pytest.raises(RunReportError, match=r"metrics\.jsonl line 2: not valid JSON"):
        load_run(copy)


def test_missing_or_mistyped_field_is_named(run_dir, tmp_path, capsys):
    copy = _copy(run_dir, tmp_path)
    summary = json.loads((copy / "summary.json").read_text())
    del summary["final"]["test_accuracy"]
    (copy / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(RunReportError, match=r"summary\.json: field 'final\.test_accuracy' is missing"):
        load_run(copy)
    summary["final"]["test_accuracy"] = 0.5
    summary["clients"]["node-1"]["epsilon"] = "high"
    (copy / "summary.json").write_text(json.dumps(summary))
    assert fedpriv_main(["report", str(copy)]) == 2
    assert "field 'clients.node-1.epsilon' should be int or float or null, got str" in capsys.readouterr().out


def test_run_without_dp_or_secure_aggregation_says_so(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path)
    summary = json.loads((copy / "summary.json").read_text())
    summary.update(dp=False, target_epsilon=None, delta=None, secure_aggregation=False, client_level=None,
                   max_client_epsilon=None)
    for client in summary["clients"].values():
        client.update(epsilon=None, delta=None, max_epsilon=None)
    (copy / "summary.json").write_text(json.dumps(summary))
    ledger = json.loads((copy / "ledger.json").read_text())
    for node in ledger["nodes"].values():
        node["epsilon_by_round"] = {}
    (copy / "ledger.json").write_text(json.dumps(ledger))
    page = write_run_report(copy).read_text(encoding="utf-8")
    assert "Differential privacy was off" in page and "in the clear" in page
    assert re.search(r'<tr data-node="node-0">\s*<td>node-0</td>\s*<td class="num" data-key="epsilon" data-value="null">-</td>',
                     page)
    assert 'id="client-level-epsilon" data-key="client_level.epsilon" data-value="null">off<' in page
