"""The Hub Space demo (examples/space/app.py) in a real headless browser (Debian's chromium): upload one
patient's lesion images, press the button, read the ranking back from the page, and check it against the
classifier run in this process."""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from PIL import Image

from _synthetic_fixtures import synthetic  # noqa: F401
from training import extrapolate
from training.data.dataset import load_slimp_dataset

REPO = Path(__file__).resolve().parent.parent
# Debian's chromium and chromium-driver (.ci/run installs them: apt-get install chromium chromium-driver).
sys.path.insert(0, str(REPO / "examples" / "space"))
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def patient(synthetic, tmp_path_factory):  # noqa: F811
    """The test patient with the most lesions, as image files, and a reference bank of the train split."""
    root = tmp_path_factory.mktemp("space")
    test, _ = load_slimp_dataset(synthetic.dataset_dir, "test")
    counts = {}
    for pid in test["patient_id"]:
        counts[pid] = counts.get(pid, 0) + 1
    chosen = max(counts, key=counts.get)
    paths = []
    for row in test:
        if row["patient_id"] == chosen:
            path = root / f"{row['image_id']}.png"
            row["image"].save(path)
            paths.append(path)
    bank = root / "bank"
    extrapolate.main(["--model_dir", synthetic.checkpoint_dir, "--reference_dir", synthetic.dataset_dir, "--target_dir",
                      synthetic.dataset_dir, "--output_dir", str(root / "extrapolation"), "--save_bank", str(bank), "--k", "3"])
    return {"paths": paths, "bank": bank, "root": root}


def test_scorer_ranks_and_explains_in_process(synthetic, patient):  # noqa: F811
    from app import HIGHLIGHT_SMALL, Scorer

    scorer = Scorer(synthetic.classifier_dir, str(patient["bank"]))
    assert scorer.positive_label == "malignant"  # the classifier's config.json names it (positive_label)
    images = [Image.open(p).convert("RGB") for p in patient["paths"]]
    names = [p.name for p in patient["paths"]]
    lesions = scorer.score(images, names, [{} for _ in names], age=55, sex="male")
    assert len(lesions) == len(names) >= 4
    probabilities = [lesion.probability for lesion in lesions]
    assert probabilities == sorted(probabilities, reverse=True) and [x.rank for x in lesions] == list(range(1, len(names) + 1))
    assert sorted(x.file for x in lesions) == sorted(names)
    assert all(len(x.neighbours) == 3 and x.neighbours[0].startswith("cosine ") for x in lesions)
    assert all(x.thumbnail.startswith("data:image/jpeg;base64,") for x in lesions)
    # The 15 highest are highlighted for more than 15 lesions; for fewer, a top 15 would be all of them: the 3 highest.
    shown = 15 if len(names) > 15 else HIGHLIGHT_SMALL
    assert [x.highlighted for x in lesions] == [True] * shown + [False] * (len(names) - shown)
    # The contributions are log-odds: with the head's constant they add up to each lesion's log-odds.
    for lesion in lesions:
        log_odds = math.log(lesion.probability / (1 - lesion.probability))
        assert sum(lesion.contributions.values()) + scorer.constant() == pytest.approx(log_odds, abs=1e-4)
    # The context is what comparing with the patient's other lesions adds: with one lesion it is 0.
    alone = scorer.score(images[:1], names[:1], [{}], age=55, sex="male")
    assert alone[0].contributions["context"] == 0.0 and alone[0].highlighted


def test_probabilities_read_as_percentages_never_as_zero():
    from app import percent

    assert [percent(p) for p in (0.4234, 0.0042, 4.2e-5, 1e-9, 0.0, 0.99999, 1.0)] == [
        "42.3%", "0.42%", "0.0042%", "<0.001%", "<0.001%", ">99.9%", "100%"]


def test_help_describes_the_demo_in_whole_sentences(capsys):
    from app import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ranked as the ISIC 2024 patient-level metric ranks them" in text and "looks at first)." in text


def fake_lesions(n: int) -> list:
    from app import ScoredLesion, highlight_count

    return [ScoredLesion(rank, f"lesion{rank}.png", 0.5 / rank, rank <= highlight_count(n),
                         {"lesion": 0.1, "patient": -0.2, "context": 0.3}, [], "data:image/jpeg;base64,")
            for rank in range(1, n + 1)]


def test_the_top_15_is_highlighted_only_for_a_patient_with_more_than_15_lesions():
    from app import render_ranking

    many = render_ranking(fake_lesions(20), "malignant", -1.0, with_bank=False)
    assert many.count('class="lesion top"') == 15 and "The 15 highest-scored" in many
    few = render_ranking(fake_lesions(6), "malignant", -1.0, with_bank=False)
    assert few.count('class="lesion top"') == 3 and "a top 15 would include every one of them" in few
    assert "nearest reference lesions" not in few  # no bank: the empty column is not shown
    assert "nearest reference lesions" in render_ranking(fake_lesions(6), "malignant", -1.0, with_bank=True)
    assert 'id="legend"' in few and "log-odds" in few


@pytest.mark.slow  # a browser
def test_demo_in_a_headless_browser(synthetic, patient):  # noqa: F811
    """Upload, score, read back the ranking; a user error first shows a message, which the later success clears,
    and leaves no traceback in the log. Set SLIMP_DEMO_SCREENSHOT to keep the screenshot (the README's is made so)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from app import Scorer, build_demo

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    port = free_port()
    demo = build_demo(synthetic.classifier_dir, str(patient["bank"]))
    log = io.StringIO()
    with contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={patient['root'] / 'chrome-profile'}", "--window-size=1300,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    names = [p.name for p in patient["paths"]]
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        upload = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#lesion-images input[type='file']")))
        driver.find_element(By.ID, "score").click()  # no images yet: a user error
        error = wait.until(lambda d: d.find_elements(By.ID, "error-message"))
        assert "Upload the patient's lesion images first" in error[0].text
        upload.send_keys("\n".join(str(p) for p in patient["paths"]))
        wait.until(lambda d: all(Path(name).stem in d.find_element(By.ID, "lesion-images").text for name in names))
        driver.find_element(By.ID, "score").click()
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ranking tr.lesion") or False)
        ranked_in_browser = [row.get_attribute("data-file") for row in rows]
        ranks = [row.find_element(By.CSS_SELECTOR, "td.rank").text for row in rows]
        shown = [row.find_element(By.CSS_SELECTOR, "td.probability").text for row in rows]
        thumbnails = driver.find_elements(By.CSS_SELECTOR, "#ranking tr.lesion img.thumbnail")
        loaded = [driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) for img in thumbnails]
        charts = driver.find_elements(By.CSS_SELECTOR, "#ranking tr.lesion svg.chart rect")
        legend = driver.find_element(By.ID, "legend")
        highlighted = driver.find_elements(By.CSS_SELECTOR, "#ranking tr.lesion.top")
        error_left = driver.find_elements(By.ID, "error-message")
        screenshot = Path(os.environ.get("SLIMP_DEMO_SCREENSHOT", patient["root"] / "demo.png"))
        driver.execute_script("arguments[0].scrollIntoView()", driver.find_element(By.ID, "status"))
        driver.save_screenshot(str(screenshot))
        legend_text = legend.text
    finally:
        driver.quit()
        demo.close()
    assert ranks == [str(r) for r in range(1, len(names) + 1)]
    images = [Image.open(p).convert("RGB") for p in patient["paths"]]
    expected = Scorer(synthetic.classifier_dir, str(patient["bank"])).score(images, names, [{} for _ in names], None, None)
    assert ranked_in_browser == [lesion.file for lesion in expected]
    assert all(text.endswith("%") and text not in ("0%", "0.0%") for text in shown), shown
    assert len(thumbnails) == len(names) and all(width for width in loaded)  # each lesion's thumbnail, decoded
    assert len(charts) == 3 * len(names) and "log-odds" in legend_text and "patient context" in legend_text
    assert len(highlighted) == (15 if len(names) > 15 else 3)
    assert error_left == [], "the error message stays after a later success"
    assert "Traceback" not in log.getvalue()
    assert screenshot.stat().st_size > 10_000
