"""The Hub Space demo (examples/space/app.py) in a real headless browser (Debian's chromium): upload one
patient's lesion images, press the button, read the ranking back from the page, and check it against the
classifier run in this process."""

from __future__ import annotations

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
    from app import COLUMNS, Scorer

    scorer = Scorer(synthetic.classifier_dir, str(patient["bank"]))
    images = [Image.open(p).convert("RGB") for p in patient["paths"]]
    names = [p.name for p in patient["paths"]]
    table = scorer.score(images, names, [{} for _ in names], age=55, sex="male")
    assert len(table) == len(names) >= 3 and len(table[0]) == len(COLUMNS)
    scores = [row[2] for row in table]
    assert scores == sorted(scores, reverse=True) and [row[0] for row in table] == list(range(1, len(names) + 1))
    assert sorted(row[1] for row in table) == sorted(names)
    assert all(row[7].count(":") >= 1 for row in table)  # nearest reference lesions listed
    # The context column is what comparing with the patient's other lesions adds: with one lesion it is 0.
    alone = scorer.score(images[:1], names[:1], [{}], age=55, sex="male")
    assert alone[0][6] == 0.0


def test_demo_in_a_headless_browser(synthetic, patient):  # noqa: F811
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from app import Scorer, build_demo

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    port = free_port()
    demo = build_demo(synthetic.classifier_dir, str(patient["bank"]))
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={patient['root'] / 'chrome-profile'}", "--window-size=1400,2600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        upload = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "#lesion-images input[type='file']")))
        upload.send_keys("\n".join(str(p) for p in patient["paths"]))
        names = [p.name for p in patient["paths"]]
        wait.until(lambda d: all(Path(name).stem in d.find_element(By.ID, "lesion-images").text for name in names))
        driver.find_element(By.ID, "score").click()

        def table(d) -> dict:  # gradio's virtual table: one div per cell, with its row and column
            return {(int(c.get_attribute("data-row")), int(c.get_attribute("data-col"))): c.text
                    for c in d.find_elements(By.CSS_SELECTOR, "#ranking [role='gridcell'][data-row]")}

        wait.until(lambda d: sorted(text for (row, col), text in table(d).items() if col == 1) == sorted(names))
        cells = table(driver)
        screenshot = Path(os.environ.get("SLIMP_DEMO_SCREENSHOT", patient["root"] / "demo.png"))
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
        demo.close()
    ranked_in_browser = [cells[row, 1] for row in range(len(names))]
    assert [cells[row, 0] for row in range(len(names))] == [str(r) for r in range(1, len(names) + 1)]
    images = [Image.open(p).convert("RGB") for p in patient["paths"]]
    expected = Scorer(synthetic.classifier_dir, str(patient["bank"])).score(images, names, [{} for _ in names], None, None)
    assert ranked_in_browser == [row[1] for row in expected]
    assert screenshot.stat().st_size > 10_000
