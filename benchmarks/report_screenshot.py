"""Screenshot of a run's HTML report in headless Chromium (what a person sees), e.g. for the README:

    python benchmarks/report_screenshot.py runs/demo [--out benchmarks/report-screenshot.png] [--width 1280]

Writes (or refreshes) ``<run>/report.html`` first, then loads it with the same DevTools driver as the report's
browser test (tests/report/headless.py) and fails when an image did not render or the page logged an error.
Needs Chromium (.ci/chromium.sh installs it) and websocket-client (the dev extra).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests" / "report") not in sys.path:  # the browser helper of the report tests (not the package)
    sys.path.insert(0, str(ROOT / "tests" / "report"))

from headless import Browser, IMAGES, find_chromium  # noqa: E402

from optimizer.report import load_run, write_html  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run folder (after mergeopt search / export)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "report-screenshot.png")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    args = parser.parse_args()
    binary = find_chromium()
    if binary is None:
        print("no chromium found; run .ci/chromium.sh or set $CHROMIUM", file=sys.stderr)
        return 1
    page = write_html(load_run(args.run))
    with Browser(binary) as browser:
        session = browser.open(page.resolve().as_uri(), width=args.width)
        images = browser.evaluate(IMAGES, session)
        errors = browser.console_errors(session)
        browser.screenshot(session, args.out, width=args.width)
    broken = [i["alt"] for i in images if not i["width"]]
    print(f"{page}: {len(images)} images, {len(broken)} broken, {len(errors)} console errors -> {args.out}")
    for problem in broken + errors:
        print(f"  {problem}", file=sys.stderr)
    return 1 if broken or errors else 0


if __name__ == "__main__":
    sys.exit(main())
