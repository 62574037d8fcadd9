"""The demo page: its functions without a browser, then the page itself in headless Chromium."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import smooth_image
from PIL import Image

from hybrid_codec import demo as demo_module
from hybrid_codec.codec import load_codec
from hybrid_codec.demo import Demo, compare, open_upload, same_size, stats_table
from hybrid_codec.errors import CodecError
from hybrid_codec.images import image_to_tensor
from hybrid_codec.metrics import ms_ssim, psnr
from hybrid_codec.rd import classic_roundtrip


@pytest.fixture(scope="module")
def photo():
    return load_codec("photo", "cpu")


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(smooth_image(96, 128, seed=3))


def test_same_size_is_the_highest_quality_not_larger(image):
    budget = len(classic_roundtrip(image, "JPEG", 40)[0]) + 5
    quality, trip, over = same_size(image, "JPEG", budget, 1, 95)
    assert not over and len(trip[0]) <= budget
    assert len(classic_roundtrip(image, "JPEG", quality + 1)[0]) > budget


def test_same_size_marks_a_budget_nothing_fits(image):
    quality, trip, over = same_size(image, "WEBP", 10, 0, 100)
    assert over and quality == 0 and trip[0] == classic_roundtrip(image, "WEBP", 0)[0]


def test_compare_reports_the_librarys_numbers(photo, image):
    results = compare(photo, image, 3)
    ours, jpeg, webp = results
    assert (ours.codec, ours.setting) == ("photo", "level 3")
    assert ours.data == photo.compress(image, 3)
    original = image_to_tensor(image)
    assert ours.psnr == pytest.approx(psnr(original, image_to_tensor(photo.decompress(ours.data))))
    assert ours.ms_ssim == pytest.approx(ms_ssim(original, image_to_tensor(ours.decoded)))
    assert ours.bpp == pytest.approx(len(ours.data) * 8 / (96 * 128))
    for r in (jpeg, webp):
        assert r.over_budget or len(r.data) <= len(ours.data)
        assert math.isfinite(r.psnr) and r.encode_ms >= 0 and r.decode_ms >= 0
    table = stats_table(results, 96 * 128)
    assert f"{len(ours.data):,}" in table and f"{ours.psnr:.2f}" in table and 'data-codec="WebP"' in table


def test_bad_uploads_are_one_line_and_leave_no_files(tmp_path, photo, image):
    page = Demo("photo", "cpu", tmp_path / "work")
    (tmp_path / "notes.png").write_text("not an image")
    huge = tmp_path / "huge.png"
    Image.new("RGB", (400, 300)).save(huge)
    page.max_pixels = 100_000
    sd = load_codec("sd", "cpu")
    page.choices = ["photo"]  # a latent of weights the page does not serve
    foreign = tmp_path / "other.latent.pt"
    foreign.write_bytes(sd.compress(image))
    truncated = tmp_path / "cut.hyb"
    truncated.write_bytes(photo.compress(image)[:20])
    for upload, expected in (
        ("notes.png", "not an image"),
        ("huge.png", "too large for the demo"),
        ("other.latent.pt", "none of the page's models"),
        ("cut.hyb", "cut.hyb"),
    ):
        view = page.run(str(tmp_path / upload), "photo", 6)
        assert view.message.startswith("**Error:**") and expected in view.message and "\n" not in view.message
        assert view.latent is None
    assert list((tmp_path / "work").iterdir()) == []
    page.close()
    assert not (tmp_path / "work").exists()


def test_open_upload_checks_the_size_before_decoding(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 10)).save(path)
    with pytest.raises(CodecError, match="300x10 is too large"):
        open_upload(path, max_pixels=2999)
    assert open_upload(path).size == (300, 10)


def test_an_uploaded_latent_is_decoded_by_the_model_that_made_it(tmp_path, image):
    page = Demo("photo", "cpu", tmp_path / "work")
    view = page.run(str(tmp_path / "none.png"), "photo", 6)
    assert view.message.startswith("**Error:**")
    path = tmp_path / "a.latent.pt"
    path.write_bytes(load_codec("sd", "cpu").compress(image))
    view = page.run(str(path), "photo", 6)
    assert "model 'sd'" in view.message and view.decoded.size == image.size
    source = tmp_path / "a.png"
    image.save(source)
    view = page.run(str(source), "photo", 2)
    assert Path(view.latent).name == "a.q2.hyb" and Path(view.latent).read_bytes() == page.codec("photo").compress(
        image, 2
    )
    view = page.run(str(source), "native", 6)  # no quality levels: the slider is ignored
    assert Path(view.latent).name == "a.latent.pt" and "8-bit" in view.stats
    page.close()


def test_the_plain_codec_does_not_import_gradio():
    code = (
        "import sys, numpy, hybrid_codec, hybrid_codec.cli\n"
        "hybrid_codec.load_codec('photo', 'cpu').compress(numpy.zeros((16, 16, 3), 'uint8'))\n"
        "assert 'gradio' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the page in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver packages")
def test_the_page_in_headless_chromium(tmp_path, photo):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    image = Image.fromarray(smooth_image(120, 160, seed=7))
    source = tmp_path / "generated.png"
    image.save(source)
    urls = []
    page, stop = demo_module.serve(free_port(), "photo", "cpu", block=False, ready=urls.append)
    workdir = Path(demo_module.os.environ["GRADIO_TEMP_DIR"]).parent
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1800",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(urls[0])
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(source))

        def row(codec: str, setting: str):
            cells = b_cells(codec)
            return cells if cells and cells[1].startswith(setting) else None

        def b_cells(codec: str):
            found = browser.find_elements(By.CSS_SELECTOR, f'#stats tr[data-codec="{codec}"] td')
            try:
                return [c.text for c in found]
            except Exception:  # the table was replaced while it was read
                return None

        wait.until(lambda b: row("photo", "level 6"))
        number = browser.find_element(By.CSS_SELECTOR, "#quality input[type=number]")
        number.send_keys(Keys.CONTROL, "a")
        number.send_keys("3", Keys.ENTER)
        ours = wait.until(lambda b: row("photo", "level 3"))
        expected = compare(photo, image, 3)
        for shown, r in zip([ours, row("JPEG", ""), row("WebP", "")], expected, strict=True):
            assert shown[1].split()[0] == r.setting.split()[-1] or shown[1].startswith(r.setting)
            assert shown[2] == f"{len(r.data):,}" and shown[3] == f"{r.bpp:.3f}"
            assert shown[4] == f"{r.psnr:.2f}" and shown[5] == f"{r.ms_ssim:.4f}"
        wait.until(
            lambda b: b.find_elements(By.CSS_SELECTOR, "#decoded img") and b.find_elements(By.CSS_SELECTOR, "#jpeg img")
        )
        link = wait.until(
            lambda b: [
                a for a in b.find_elements(By.CSS_SELECTOR, "#latent a") if "q3.hyb" in (a.get_attribute("href") or "")
            ]
        )
        with urllib.request.urlopen(link[0].get_attribute("href")) as response:
            assert response.read() == photo.compress(image, 3)
        screenshot = tmp_path / "demo.png"
        browser.save_screenshot(str(screenshot))
        assert Image.open(screenshot).size[0] > 0

        (tmp_path / "bad.png").write_text("not an image")
        browser.find_element(By.CSS_SELECTOR, "#upload button[aria-label*=lear]").click()  # remove the image
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(tmp_path / "bad.png"))
        wait.until(lambda b: "not an image" in b.find_element(By.ID, "message").text)
        assert row("photo", "") is None  # the numbers of the last image are gone with it
    finally:
        browser.quit()
        stop()
    assert not workdir.exists()
    with pytest.raises(OSError):
        urllib.request.urlopen(urls[0], timeout=2)


def test_the_command_parses_and_calls_serve(monkeypatch):
    from typer.testing import CliRunner

    from hybrid_codec.cli import app

    calls = []
    monkeypatch.setattr(demo_module, "serve", lambda *args, **kw: calls.append(args) or kw["ready"]("http://x"))
    result = CliRunner().invoke(app, ["demo", "--port", "1234", "--model", "sd"])
    assert result.exit_code == 0 and calls == [(1234, "sd", "auto", "127.0.0.1")] and "http://x" in result.stdout


def test_a_bad_model_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hybrid_codec.cli import app

    monkeypatch.setattr(demo_module.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "unused"))
    result = CliRunner().invoke(app, ["demo", "--model", "nowhere.safetensors"])
    assert result.exit_code == 1 and "neither a shipped model" in result.stderr
    assert list(tmp_path.iterdir()) == []
