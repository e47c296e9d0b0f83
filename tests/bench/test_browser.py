"""bench.browser: the DevTools-protocol driver reports console errors and takes screenshots."""
from __future__ import annotations

from PIL import Image

from bench.browser import main


def test_console_errors_are_reported_and_a_clean_page_passes(chromium, tmp_path, capsys):
    bad = tmp_path / "bad.html"
    bad.write_text('<p>x</p><script>console.error("boom"); missing();</script>'
                   '<img src="nope.png">')
    assert main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "3 console error(s)" in out and "boom" in out and "missing is not defined" in out
    assert "nope.png" in out
    good = tmp_path / "good.html"
    good.write_text('<body style="background:#f00"><p>fine</p><script>console.log(1)</script>')
    shot = tmp_path / "good.png"
    assert main([str(good), "--screenshot", str(shot), "--size", "400x300", "--scale", "0.5",
                 "--palette"]) == 0
    assert "0 console error(s)" in capsys.readouterr().out
    image = Image.open(shot)
    assert image.size == (200, 150) and image.mode == "P"
    assert image.convert("RGB").getpixel((100, 140)) == (255, 0, 0)
