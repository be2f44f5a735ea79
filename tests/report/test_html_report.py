"""The HTML report as a person sees it: one self-contained file, opened in
headless Chromium and checked on the screenshot's pixels."""
import re
import shutil
import subprocess

from PIL import Image
from samples import make_run

from conftest import need
from kvmsplit.report.html import PAGE_SIZES, VERDICT_COLOR, html_report

pytest_plugins = ["cli_fixture"]      # kv


def test_the_report_is_self_contained_and_complete():
    rr = make_run()
    page = html_report(rr, "/srv/ci/results.json")
    assert not re.search(r"<script|<link|<img|<iframe|url\(|(src|href)=\"?[a-z]+:", page, re.I)
    # a page-size timeline and a phase-time plot for each scenario that ran phases
    assert page.count('class="pagesizes"') == page.count('class="phasetimes"') == 3
    assert "<h3>kernel: WARNING in kvm_mmu_split_huge_pages</h3>" in page
    assert "kvm_vm_ioctl_clear_dirty_log+0x1c3/0x2a0 [kvm]" in page
    assert "kvmsplit rerun /srv/ci/results.json --only thp/2m/manual" in page
    assert "Xeon" in page and "eager_page_split" in page and "split faster v3" in page


def _colour_count(img: Image.Image, hex_colour: str) -> int:
    rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return sum(n for n, c in img.getcolors(maxcolors=1 << 24) if c[:3] == rgb)


def test_the_report_renders_in_chromium(kv, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    need(chromium is not None, "chromium not installed (apt-get install chromium)")
    make_run().write(tmp_path)
    rc, _, err = kv("report", tmp_path / "results.json", "-o", tmp_path / "report.html")
    assert rc == 0, err
    png = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}",
                    "--window-size=1280,1600", (tmp_path / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    img = Image.open(png).convert("RGB")
    assert img.size == (1280, 1600)
    assert len(img.getcolors(maxcolors=1 << 24)) > 50          # not a blank or error page
    # the verdict badges, solid-filled, and the page-size bars (4K and 2M) of the first plot
    for colour in (VERDICT_COLOR["PASS"], VERDICT_COLOR["FAIL"], VERDICT_COLOR["ERROR"],
                   PAGE_SIZES[0][3], PAGE_SIZES[1][3]):
        assert _colour_count(img, colour) > 300, colour
