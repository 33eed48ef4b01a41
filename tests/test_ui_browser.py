"""The MLflow UI in headless Chromium (Debian's /usr/bin/chromium driven by Playwright; no browser download):
a finished tiny sweep shows its registered model, the `candidate` alias and a sample image; `champion` set in
the UI is what `fluxtune models list` then reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from fluxtune.tracking.server import start_server, stop_server
from reference import MODEL

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
MIN_GRIDS = 5  # eval points of the reference sweep: steps 2, 6, 10, 12 and every stage end


@pytest.fixture(scope="module")
def store(reference_sweep, tmp_path_factory):
    """A copy of the reference sweep's MLflow store: this module sets an alias through the UI."""
    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    return reference_sweep.copy_store(tmp_path_factory.mktemp("ui-store"))


@pytest.fixture(scope="module")
def ui(store):
    process, url = start_server(store, log_path=store.parent / "mlflow-server.log")
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


def _trial_run(store: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version_by_alias(MODEL, "candidate")
    return client, client.get_run(version.run_id)


def test_the_registered_model_shows_its_version_with_the_candidate_alias(page, ui):
    from playwright.sync_api import expect

    page.goto(f"{ui}/#/models/{MODEL}")
    expect(page.get_by_text("Version 1", exact=True)).to_be_visible()
    expect(page.get_by_text("@ candidate")).to_be_visible()
    expect(page.get_by_text("@ champion")).to_have_count(0)


def test_a_sample_image_grid_renders_in_the_trial_artifacts(page, ui, store):
    from playwright.sync_api import expect

    client, run = _trial_run(store)
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert len(grids) >= MIN_GRIDS, grids
    page.goto(f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts")
    page.get_by_text("samples", exact=True).first.click()
    page.get_by_text(Path(grids[0]).name, exact=True).first.click()
    image = page.locator("img[src^='blob:']").first
    expect(image).to_be_visible()
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=image.element_handle())
    # source | mask | prediction | target at 32 px, one row per validation example shown (up to 4)
    width, height = image.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert width == 4 * 32 and height % 32 == 0 and 32 <= height <= 4 * 32


def test_champion_set_in_the_ui_is_what_fluxtune_models_list_shows(page, ui, store, reference_sweep):
    from playwright.sync_api import expect

    page.goto(f"{ui}/#/models/{MODEL}/versions/1")
    page.get_by_title("Edit aliases").click()
    dialog = page.get_by_role("dialog")
    box = dialog.get_by_role("combobox")
    box.fill("champion")
    box.press("Enter")
    dialog.get_by_role("button", name="Save aliases").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_text("@ champion")).to_be_visible()

    env = {**reference_sweep.env, "COLUMNS": "200"}
    listed = run_cli(["models", "list", MODEL], cwd=store.parent, env=env)  # ./mlflow: the copy
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert "champion" in row and "candidate" in row
