"""The HTML report in a real browser: headless Chromium, driven over the DevTools protocol (headless.py).

Skipped when no Chromium is installed (.ci/chromium.sh installs Debian's package), unless
MERGEOPT_REQUIRE_CHROMIUM=1 (CI), where a missing browser fails the test.
"""

import os

import pytest
from headless import find_chromium, inspect_page

from optimizer.report import load_run, write_html


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = find_chromium()
    if binary is None:
        message = "no chromium on PATH (run .ci/chromium.sh, or set $CHROMIUM)"
        if os.environ.get("MERGEOPT_REQUIRE_CHROMIUM") == "1":
            pytest.fail(message + "; MERGEOPT_REQUIRE_CHROMIUM=1 requires it")
        pytest.skip(message)
    pytest.importorskip("websocket", reason="websocket-client is in the dev extra")
    return binary


def test_every_image_of_the_report_renders_without_console_errors(chromium, report_run, tmp_path):
    page = write_html(load_run(report_run), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    result = inspect_page(page, screenshot=shot, binary=chromium)
    assert result["title"] == "mergeopt report: report"
    assert len(result["images"]) == 4
    for image in result["images"]:
        assert image["complete"] and image["width"] > 100 and image["height"] > 100, image
    assert result["errors"] == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_a_broken_image_and_a_console_error_are_caught(tmp_path, chromium):
    # the check itself must be able to fail: a truncated PNG and a script error
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><title>bad</title></head><body>'
                    '<img alt="broken" src="data:image/png;base64,iVBORw0KGgo=">'
                    "<script>console.error('boom')</script></body></html>")
    result = inspect_page(page, binary=chromium)
    assert [i["width"] for i in result["images"]] == [0]
    assert any("boom" in e for e in result["errors"])
