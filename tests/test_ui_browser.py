"""What a person sees in the MLflow UI and the Optuna dashboard, in headless Chromium (Debian's /usr/bin/chromium
driven by Playwright; no browser download), on copies of the reference sweep's and the small ASHA sweep's stores:
the link `fluxtune ui` prints opens the training runs with the trials nested under their sweep; a trial's image
series starts at step 0 with a labelled grid; a stopped trial says so; the registered model has its `candidate`
alias, and `champion` set in the UI is what `fluxtune models list` then reports; the dashboard shows the study.

Screenshots of the runs view, a sample grid, the image card, the stopped trial and the dashboard are kept for a
person to look at: in $FLUXTUNE_UI_SCREENSHOTS, else the session's temporary folder (`ui-screenshots/`, printed
with -s; pytest removes old ones)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_cli
from fluxtune.flux.preview import COLUMNS, LABEL_HEIGHT, PANEL_MIN
from fluxtune.tracking.server import experiment_links, start_server, stop_server
from reference import EXPERIMENT, MODEL

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
RANKS = (4, 8)  # the reference sweep's grid: trials r4 and r8
PANEL = PANEL_MIN  # its 32 px examples are enlarged 3x in the grids


@pytest.fixture(scope="module")
def store(reference_sweep, tmp_path_factory):
    """A copy of the reference sweep's MLflow store: this module sets an alias through the UI."""
    assert reference_sweep.result.returncode == 0, reference_sweep.failure()
    return reference_sweep.copy_store(tmp_path_factory.mktemp("ui-store"))


@pytest.fixture(scope="module")
def asha_store(asha_sweep, tmp_path_factory):
    assert asha_sweep.result.returncode == 0, asha_sweep.failure()
    return asha_sweep.copy_store(tmp_path_factory.mktemp("ui-asha-store"))


@pytest.fixture(scope="module")
def ui(store):
    process, url = start_server(store, log_path=store.parent / "mlflow-server.log")
    yield url
    stop_server(process)


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("FLUXTUNE_UI_SCREENSHOTS") or tmp_path_factory.getbasetemp() / "ui-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # the UI fetches after it renders; a loaded machine takes seconds
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, shots, request):
    """A fresh browser profile per test (no view switch remembered from another test)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    # MLflow's assistant panel opens itself on a first visit and covers a third of every screenshot
    context.add_init_script("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                            "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    page.screenshot(path=str(shots / f"last-{request.node.name}.png"))  # a failure's post-mortem
    context.close()


def _client(store: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{store / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def _trial_run(store: Path):
    client = _client(store)
    version = client.get_model_version_by_alias(MODEL, "candidate")
    return client, client.get_run(version.run_id)


def test_the_link_fluxtune_ui_prints_opens_the_training_runs_with_trials_under_their_sweep(page, ui, store, shots):
    from playwright.sync_api import expect

    links = dict(experiment_links(ui))
    page.goto(links[EXPERIMENT])
    expect(page.get_by_role("heading", name="Runs")).to_be_visible()
    expect(page.get_by_text("Traces", exact=True).first).to_be_visible()  # the sidebar of the training view ...
    expect(page.get_by_text("Token Usage")).to_have_count(0)  # ... not GenAI's trace and cost charts
    sweep = _client(store).get_run(_trial_run(store)[1].data.tags["mlflow.parentRunId"])
    expect(page.get_by_text(sweep.info.run_name).first).to_be_visible()
    for rank in RANKS:  # trials are nested: hidden until their sweep's row is expanded
        expect(page.get_by_role("link", name=f"r{rank}", exact=True)).to_have_count(0)
    page.get_by_role("row").filter(has_text=sweep.info.run_name).get_by_role("button").first.click()
    for rank in RANKS:
        expect(page.get_by_role("link", name=f"r{rank}", exact=True)).to_be_visible()
    page.screenshot(path=str(shots / "runs-view.png"))


def test_a_trials_image_series_starts_at_step_0_with_a_labelled_grid(page, ui, store, shots):
    from PIL import Image
    from playwright.sync_api import expect

    client, run = _trial_run(store)
    steps = sorted({int(Path(a.path).name.split("+")[2]) for a in client.list_artifacts(run.info.run_id, "images")})
    assert steps[0] == 0 and len(steps) >= 5, steps  # the starting weights, then every evaluation
    assert not client.list_artifacts(run.info.run_id, "samples")  # each image stored once
    page.goto(f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics"
              "?workflowType=machine_learning")
    page.get_by_placeholder("Search metric charts").fill("samples")
    image = page.locator("img[src*='samples%2Bstep%2B0%2B'], img[src*='samples+step+0+']").first
    expect(image).to_be_visible()  # the image card opens at step 0: a grid, not "No image logged at this step"
    expect(page.get_by_text("No image logged at this step")).to_have_count(0)
    card = page.locator("div").filter(has=page.get_by_text("samples", exact=True)).filter(has=image).last
    card.get_by_role("button").first.click()  # the card's full-screen view
    expect(page.get_by_role("dialog")).to_be_visible()
    page.screenshot(path=str(shots / "image-card.png"))

    first = next(a.path for a in client.list_artifacts(run.info.run_id, "images")
                 if "+step+0+" in a.path and a.path.endswith(".png"))
    page.goto(f"{ui}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts"
              "?workflowType=machine_learning")
    page.get_by_text("images", exact=True).first.click()
    page.get_by_text(Path(first).name, exact=True).first.click()
    shown = page.locator("img[src^='blob:']").first
    expect(shown).to_be_visible()
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=shown.element_handle())
    page.screenshot(path=str(shots / "sample-grid-in-the-ui.png"))
    grid = Image.open(client.download_artifacts(run.info.run_id, first, str(shots.parent)))
    grid.save(shots / "sample-grid.png")
    # a header row naming source | mask | prediction | target, then one row per validation example shown (≤ 4)
    assert grid.width == len(COLUMNS) * PANEL and (grid.height - LABEL_HEIGHT) % PANEL == 0
    assert 1 <= (grid.height - LABEL_HEIGHT) // PANEL <= 4
    header = grid.crop((0, 0, grid.width, LABEL_HEIGHT)).convert("L")
    assert all(max(header.crop((x * PANEL, 0, (x + 1) * PANEL, LABEL_HEIGHT)).getdata()) > 127 for x in range(4))


def test_a_stopped_trial_says_so_on_its_page(page, browser, asha_store, shots):
    from playwright.sync_api import expect

    client = _client(asha_store)
    stopped = next(r for r in client.search_runs([client.get_experiment_by_name("asha").experiment_id])
                   if r.data.tags.get("fluxtune.status") == "stopped")
    step = stopped.data.tags["fluxtune.stopped_at_step"]
    process, url = start_server(asha_store, log_path=asha_store.parent / "mlflow-server.log")
    try:
        page.goto(f"{url}/#/experiments/{stopped.info.experiment_id}/runs/{stopped.info.run_id}"
                  "?workflowType=machine_learning")
        expect(page.get_by_text(f"by the ASHA scheduler at step {step} of 6")).to_be_visible()
        expect(page.get_by_text("fluxtune.stopped_by")).to_be_visible()
        page.screenshot(path=str(shots / "stopped-trial.png"))
    finally:
        stop_server(process)


def test_the_dashboard_shows_the_sweeps_optuna_study(page, asha_sweep, asha_store, shots):
    from playwright.sync_api import expect

    from fluxtune.cli.dashboard import start_dashboard
    from fluxtune.serving import free_port, stop

    study = next((asha_sweep.work / "runs").glob("asha-*/sweep.json")).parent.name
    process, url = start_dashboard(asha_store / "optuna.db", free_port(), log_path=asha_store.parent / "dash.log")
    try:
        page.goto(url)
        page.get_by_text(study).first.click()
        expect(page.get_by_text("stages.full.optimizer.lr").first).to_be_visible()  # the searched parameter
        page.screenshot(path=str(shots / "dashboard.png"))
    finally:
        stop(process)


def test_the_registered_model_shows_its_version_with_the_candidate_alias(page, ui):
    from playwright.sync_api import expect

    page.goto(f"{ui}/#/models/{MODEL}")
    expect(page.get_by_text("Version 1", exact=True)).to_be_visible()
    expect(page.get_by_text("@ candidate")).to_be_visible()
    expect(page.get_by_text("@ champion")).to_have_count(0)


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

    listed = run_cli(["models", "list", MODEL], cwd=store.parent, env=reference_sweep.env)  # ./mlflow: the copy
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.strip("│ ").startswith("1 "))
    assert "champion" in row and "candidate" in row
