"""The MLflow UI in headless Chromium (Debian's /usr/bin/chromium driven by Playwright; no browser download):
a finished tiny sweep shows its registered model, the `candidate` alias and a sample image; `champion` set in
the UI is what `fluxtune models list` then reports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_cli
from fluxtune.tracking.server import start_server, stop_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
MIN_GRIDS = 5  # eval points at steps 2 and 6, the full stage's end (4), the lora stage's end (8: before and after merging)
SWEEP = """\
name: ui
base:
  data: {jsonl: sample, resolution: 64, batch_size: 4}
  eval_every: 2
  stages:
    - {name: full, type: full, steps: 4, optimizer: {lr: 1.0e-3}}
    - {name: lora, type: lora, steps: 4, optimizer: {lr: 2.0e-3}, adapter: {type: lora, rank: 4}}
search: {num_samples: 1, scheduler: {type: fifo}}
tracking: {experiment: ui, register_as: ui-lora}
"""


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, session_cache):
    workdir = tmp_path_factory.mktemp("ui-sweep")
    (workdir / "sweep.yaml").write_text(SWEEP)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env.update(FLUXTUNE_CACHE=str(session_cache), PYTHONUNBUFFERED="1")
    result = run_cli(["search", "sweep.yaml"], cwd=workdir, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, env


@pytest.fixture(scope="module")
def ui(finished_sweep):
    workdir, _ = finished_sweep
    process, url = start_server(workdir / "mlflow", log_path=workdir / "mlflow-server.log")
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def page(ui, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        yield page
        page.screenshot(path=str(tmp_path_factory.getbasetemp() / "ui-last-page.png"))  # for a failure's post-mortem
        browser.close()


def _trial_run(workdir: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias("ui-lora", "candidate")
    return client, client.get_run(version.run_id)


def test_the_registered_model_shows_its_version_with_the_candidate_alias(page, ui):
    from playwright.sync_api import expect

    page.goto(f"{ui}/#/models/ui-lora")
    expect(page.get_by_text("Version 1", exact=True)).to_be_visible()
    expect(page.get_by_text("@ candidate")).to_be_visible()
    expect(page.get_by_text("@ champion")).to_have_count(0)


def test_a_sample_image_grid_renders_in_the_trial_artifacts(page, ui, finished_sweep):
    from playwright.sync_api import expect

    client, run = _trial_run(finished_sweep[0])
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert len(grids) >= MIN_GRIDS, grids
    page.goto(f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts")
    page.get_by_text("samples", exact=True).first.click()
    page.get_by_text(Path(grids[0]).name, exact=True).first.click()
    image = page.locator("img[src^='blob:']").first
    expect(image).to_be_visible()
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=image.element_handle())
    # source | mask | prediction | target at 64 px, one row per validation example shown (up to 4)
    width, height = image.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert width == 4 * 64 and height % 64 == 0 and 64 <= height <= 4 * 64


def test_champion_set_in_the_ui_is_what_fluxtune_models_list_shows(page, ui, finished_sweep):
    from playwright.sync_api import expect

    workdir, env = finished_sweep
    page.goto(f"{ui}/#/models/ui-lora/versions/1")
    page.get_by_title("Edit aliases").click()
    dialog = page.get_by_role("dialog")
    box = dialog.get_by_role("combobox")
    box.fill("champion")
    box.press("Enter")
    dialog.get_by_role("button", name="Save aliases").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_text("@ champion")).to_be_visible()

    listed = run_cli(["models", "list", "ui-lora"], cwd=workdir, env={**env, "COLUMNS": "200"})  # ./mlflow
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert "champion" in row and "candidate" in row
