"""End to end in a real browser: Playwright drives Debian's Chromium (headless) through the Gradio chat.

Run with `make test-browser` (marker `browser`). Playwright's own browser download does not work offline, so the
set-up installs Debian's `chromium` with apt-get when /usr/bin/chromium is missing. Screenshots of the end and the start of
the conversation are written to outputs/browser/chat.png and chat-start.png; the prior/current and volume
conversation to outputs/browser/chat-inputs.png.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import random_image

from serve.app import build_app, find_examples
from serve.engine import Engine, Limits

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "outputs" / "browser" / "chat.png"


@pytest.fixture(scope="module")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        if shutil.which("apt-get") is None:
            pytest.fail(f"{CHROMIUM} is missing and apt-get is not available to install Debian's chromium")
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
            if done.returncode != 0:
                pytest.fail(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr[-2000:]}")
    return CHROMIUM


@pytest.fixture(scope="module")
def live(tiny_model_dir):
    from test_serve import start_server

    engine = Engine.load(tiny_model_dir, limits=Limits(concurrency=1, max_new_tokens=256, max_images=12))
    server, thread, url = start_server(build_app(engine, find_examples()))
    yield url, engine
    server.should_exit = True
    thread.join(timeout=10)


# Gradio renders the components of a closed accordion only when it is first opened, and one animation frame after
# they appear it pushes their initial values into them once more (`render_previously_invisible_children` in its
# frontend): a value typed in between is silently replaced by the default. That is how the temperature went back
# to 0 in about one run in ten, and the greedy tiny model answered blank lines (`answers ['']`). `_open` waits
# until that push is over; `_set_number` and `_fill` then check that the value has stayed.
_NEXT_FRAMES = (
    "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(done))))"
)
SAMPLING = ("#temperature", "#top-p", "#max-new-tokens", "#seed")
STUDIES = ("#prior-files", "#prior-date", "#current-files", "#current-date")


def _open(page, elem_id: str, parts: tuple[str, ...]) -> None:
    """Open an accordion and wait until its `parts` (selectors) are rendered and Gradio has pushed their values."""
    page.click(f"#{elem_id} button, #{elem_id} .label-wrap")
    for part in parts:
        page.wait_for_selector(f"{part} input, {part} textarea", state="attached", timeout=15_000)
    page.evaluate(_NEXT_FRAMES)


def _fill(page, selector: str, text: str, enter: bool = False) -> None:
    """Type `text` into a field (then Enter if `enter`) and check that it is still there a few frames later."""
    field = page.locator(selector).first
    field.fill(text)
    if enter:
        field.press("Enter")
    page.evaluate(_NEXT_FRAMES)
    shown = field.input_value()
    assert shown == text, f"{selector} shows {shown!r} after {text!r} was typed into it"


def _set_number(page, elem_id: str, value) -> None:
    _fill(page, f"#{elem_id} input[type=number]", str(value), enter=True)


def _wait_idle(page, engine, n_answers: int, timeout: float = 60) -> list[str]:
    """Wait until `n_answers` bot messages are shown and no generation is pending; return their texts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answers = page.locator("#chatbot [data-testid='bot']").all_inner_texts()
        if len(answers) >= n_answers and engine.pending == 0 and all(a.strip() for a in answers):
            time.sleep(0.3)  # the last streamed update reaches the page
            return page.locator("#chatbot [data-testid='bot']").all_inner_texts()
        time.sleep(0.1)
    answers = page.locator("#chatbot [data-testid='bot']").all_inner_texts()
    raise AssertionError(
        f"no answer {n_answers} within {timeout} s: {engine.pending} pending, answers {answers!r}"
    )


# Records every distinct length of the last bot message as the page updates, to see the answer stream in.
_WATCH = """() => {
  window.__lengths = [];
  const chat = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll("[data-testid='bot']");
    if (!bots.length) return;
    const n = bots[bots.length - 1].innerText.length;
    if (window.__lengths[window.__lengths.length - 1] !== n) window.__lengths.push(n);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def test_chat_in_headless_chromium(chromium, live, tmp_path):
    from playwright.sync_api import sync_playwright
    from pydicom.data import get_testdata_file

    url, engine = live
    scan = tmp_path / "patient-scan.png"
    random_image(4, (160, 120)).save(scan)
    dicom = tmp_path / "study.dcm"
    dicom.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url + "/")
        page.wait_for_selector("#question textarea", timeout=30_000)
        assert "not for clinical use" in page.inner_text("#notice").lower()

        # Sampling controls: the random test model only says something other than blank lines when sampling.
        _open(page, "sampling", SAMPLING)
        _set_number(page, "temperature", 1.0)
        _set_number(page, "seed", 11)
        _set_number(page, "max-new-tokens", 48)

        # Turn 1: upload an image, ask, and watch the answer stream in.
        page.evaluate(_WATCH)
        page.set_input_files("#question input[type=file]", str(scan))
        page.wait_for_selector("#question img", timeout=15_000)  # the attachment's thumbnail
        page.fill("#question textarea", "Is there an abnormality?")
        page.press("#question textarea", "Enter")
        first = _wait_idle(page, engine, 1)
        lengths = page.evaluate("window.__lengths")
        assert len([n for n in lengths if n > 0]) >= 3, (
            f"the answer did not stream in: lengths seen {lengths}"
        )
        assert "Image 1" in page.inner_text("#image-info")
        assert page.locator("#preview img").count() == 1

        # Turn 2: a follow-up about the same image.
        page.fill("#question textarea", "Where exactly is it?")
        page.press("#question textarea", "Enter")
        answers = _wait_idle(page, engine, 2)
        assert answers[0] == first[0] and answers[1].strip()

        # Turn 3: a new image mid-conversation, a DICOM file: shown as a windowed preview, no identifiers.
        page.set_input_files("#question input[type=file]", str(dicom))
        page.wait_for_selector("#question img, #question .thumbnail-item", timeout=15_000)
        page.fill("#question textarea", "And this CT slice?")
        page.press("#question textarea", "Enter")
        answers = _wait_idle(page, engine, 3)
        info = page.inner_text("#image-info")
        assert "Image 2" in info and "DICOM" in info and "CT" in info
        user_texts = page.locator("#chatbot [data-testid='user']").all_inner_texts()
        assert [t for t in user_texts if t.strip()] == [
            "Is there an abnormality?",
            "Where exactly is it?",
            "And this CT slice?",
        ]
        content = page.content()
        for secret in ("CompressedSamples", "study.dcm", "patient-scan"):  # DICOM patient name, file names
            assert secret not in content

        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)  # the end of the conversation
        page.eval_on_selector("#chatbot [role=log]", "log => { log.scrollTop = 0; }")
        time.sleep(0.3)
        page.screenshot(path=str(SCREENSHOT.with_name("chat-start.png")), full_page=True)  # and its start
        browser.close()


def _ct_nifti(path: Path) -> None:
    """A small CT-like volume (air around a body whose brightness grows along z) as .nii.gz."""
    import nibabel as nib
    import numpy as np

    w = np.full((16, 20, 10), -1000, dtype=np.int16)  # x, y, z
    for z in range(10):
        w[2:14, 3:17, z] = 20 + 15 * z
    nib.save(nib.Nifti1Image(w, np.diag([-0.8, -0.8, 2.5, 1.0])), path)


def test_prior_current_and_volume_uploads_in_headless_chromium(chromium, live, tmp_path):
    from playwright.sync_api import sync_playwright

    url, engine = live
    prior, current, volume = tmp_path / "scan-a.png", tmp_path / "scan-b.png", tmp_path / "series.nii.gz"
    random_image(5, (96, 80)).save(prior)
    random_image(6, (96, 80)).save(current)
    _ct_nifti(volume)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(url + "/")
        page.wait_for_selector("#question textarea", timeout=30_000)
        assert "not for clinical use" in page.inner_text("#notice").lower()
        _open(page, "sampling", SAMPLING)
        _set_number(page, "temperature", 1.0)
        _set_number(page, "seed", 3)
        _set_number(page, "max-new-tokens", 24)

        # Turn 1: a prior and a current study in their slots, with the prior's date.
        _open(page, "studies", STUDIES)
        page.set_input_files("#prior-files input[type=file]", str(prior))
        page.set_input_files("#current-files input[type=file]", str(current))
        _fill(page, "#prior-date input, #prior-date textarea", "2025-03-01")
        page.wait_for_function(
            "() => ['#prior-files', '#current-files'].every(id => document.querySelector(id).innerText.includes('scan-'))",
            timeout=15_000,
        )
        page.fill("#question textarea", "Has the lesion grown?")
        page.press("#question textarea", "Enter")
        _wait_idle(page, engine, 1)
        user = "\n".join(page.locator("#chatbot [data-testid='user']").all_inner_texts())
        assert "Image 1: prior study (2025-03-01). Image 2: current study." in user
        assert "Has the lesion grown?" in user
        assert page.locator("#chatbot [data-testid='user'] img").count() >= 2  # both previews
        info = page.inner_text("#image-info")
        assert "Images the answers are about" in info and "Image 1: prior study (2025-03-01)" in info
        page.wait_for_function("() => !document.querySelector('#prior-files').innerText.includes('scan-')")

        # Turn 2: a NIfTI volume in the question box: its slices, a slice scroller and a CT window choice.
        page.set_input_files("#question input[type=file]", str(volume))
        page.wait_for_selector("#question img, #question .thumbnail-item", timeout=15_000)
        page.fill("#question textarea", "On how many slices is it visible?")
        page.press("#question textarea", "Enter")
        _wait_idle(page, engine, 2)
        user = "\n".join(page.locator("#chatbot [data-testid='user']").all_inner_texts())
        assert "Images 3-10: CT volume in lung, soft tissue and bone windows" in user
        assert "Slices (axial, inferior to superior, mm from the first): 0, " in user
        info = page.inner_text("#image-info")
        assert "NIfTI" in info and "10 axial slices" in info
        page.wait_for_selector("#slice-scroller", state="visible", timeout=15_000)
        scroller = page.locator("#slice-scroller input[type=number]")
        scroller.fill("2")
        scroller.press("Tab")  # leaving the number box releases the slider
        page.wait_for_function(
            "() => document.querySelector('#image-info').innerText.includes('Showing slice 2 of 10')",
            timeout=15_000,
        )
        window = page.locator("#preview-window input")
        window.click()
        window.fill("bone")
        window.press("Enter")
        page.wait_for_function(
            "() => document.querySelector('#image-info').innerText.includes('bone (W1800/L400)')",
            timeout=15_000,
        )
        assert page.locator("#preview img").count() == 1
        content = page.content()
        for secret in ("scan-a", "scan-b", "series.nii"):  # file names are never shown once sent
            assert secret not in content
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT.with_name("chat-inputs.png")), full_page=True)
        browser.close()
