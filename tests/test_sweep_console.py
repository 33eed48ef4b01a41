"""What a sweep says on the console and in its summary: trials named by their values, progress that reads in a log
file, a table of trials that stays one line per row when piped, and the demo that compares what its name says."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from conftest import REPO, run_cli
from fluxtune.cli.console import PIPE_WIDTH, make_console
from fluxtune.cli.summary import print_summary, trial_status
from fluxtune.search.names import column_labels, format_value, trial_name, unique_names
from fluxtune.search.progress import SweepProgress

LORA = {"stages.lora.adapter.rank": 16, "stages.lora.adapter.alpha": 96, "stages.lora.optimizer.lr": 0.0021,
        "cycles": 2}


def test_a_trial_is_named_by_its_sampled_values():
    assert trial_name(LORA) == "r16-a96-lr2.1e-3-c2"
    assert trial_name({"stages.lora.adapter.dropout": 0.05, "stages.lora.adapter.type": "dora"}) == "do0.05-dora"
    assert trial_name({}) == "run"  # `fluxtune run`: nothing sampled
    assert [format_value(v) for v in (96.0, 1e-5, 12345.0, 0.5, True, "lora")] == ["96", "1e-5", "12345", "0.5",
                                                                                   "on", "lora"]


def test_keys_that_end_alike_are_told_apart_by_their_stage():
    paths = ["stages.full.optimizer.lr", "stages.lora.optimizer.lr", "cycles"]
    assert column_labels(paths) == {"stages.full.optimizer.lr": "full lr", "stages.lora.optimizer.lr": "lora lr",
                                    "cycles": "cycles"}
    assert trial_name(dict(zip(paths, (1e-5, 3e-4, 1)))) == "full_lr1e-5-lora_lr3e-4-c1"


def test_names_are_unique_within_a_sweep_in_start_order():
    names = unique_names([("a", {"cycles": 1}), ("b", {"cycles": 2}), ("c", {"cycles": 1}), ("d", {"cycles": 1})])
    assert names == {"a": "c1", "b": "c2", "c": "c1-2", "d": "c1-3"}


def _board(live: bool = False) -> tuple[SweepProgress, io.StringIO]:
    out = io.StringIO()
    return SweepProgress(Console(file=out, width=120), "val_loss", "min", total=3, live=live), out


def test_progress_in_a_log_file_is_plain_lines_with_a_status_after_each_trial():
    board, out = _board()
    board.started("t1", "r16-a96", {"stages.lora.adapter.rank": 16}, planned=100)
    board.result("t1", 20, 1.08)
    board.result("t1", 40, 1.03, where="cycle 0 full", stage_end=True)
    board.ended("t1", "finished", "val_loss=1.03")
    board.started("t2", "r8-a96", {"stages.lora.adapter.rank": 8}, planned=100)
    board.result("t2", 60, 1.10)
    board.ended("t2", "stopped", "asha stopped it at step 60 of 100")
    board.started("t3", "r4-a96", {"stages.lora.adapter.rank": 4}, planned=100)
    board.ended("t3", "failed", "boom")
    lines = out.getvalue().splitlines()
    assert "\x1b" not in out.getvalue()  # no cursor movement or colour codes in a file
    assert lines[0] == "r16-a96 started (trial t1, 100 steps): rank=16"
    assert "  r16-a96 step 40/100: val_loss=1.03 (cycle 0 full ended)" in lines
    assert "r8-a96 stopped early: asha stopped it at step 60 of 100" in lines
    assert lines[-1] == ("trials of 3: 0 running, 1 finished, 1 stopped, 1 failed (3 done); "
                         "best val_loss=1.03 (r16-a96)")


def test_live_progress_on_a_terminal_keeps_the_events_and_clears_its_bars():
    board, out = _board(live=True)
    board.started("t1", "r16-a96", {}, planned=10)
    board.result("t1", 5, 0.5)  # a bar update, not a line
    board.result("t1", 10, 0.4, where="cycle 0 lora", stage_end=True)
    board.ended("t1", "finished", "val_loss=0.4")
    board.close()
    text = out.getvalue()
    assert "r16-a96 started" in text and "r16-a96 finished" in text and "cycle 0 lora ended at step 10" in text
    assert board.status_line() == "trials of 3: 0 running, 1 finished, 0 stopped, 0 failed (1 done); " \
                                  "best val_loss=0.4 (r16-a96)"


def _outcome(trials):
    return SimpleNamespace(sweep_id="lora-rank-1", trials=trials, best_trial="t1", trained_steps=160,
                           interrupted=False, best_metric=1.0, best_config=trials[0]["config"], best_yaml="best.yaml",
                           tracking_uri="sqlite:///m.db", experiment="lora-rank", parent_run_id="p", model_version="1",
                           model_name="flux-fill-lora", study_counts={}, storage_path="runs/x",
                           disk_bytes=3 << 20, weight_files=2, keep="needed")


def _trial(trial, rank, steps, error="", value=1.0):
    return {"trial": trial, "config": {"stages.lora.adapter.rank": rank, "stages.lora.adapter.alpha": 96,
                                       "stages.lora.optimizer.lr": 2.1e-3, "cycles": 1},
            "error": error, "val_loss": value, "steps": steps, "planned_steps": 100, "reused_steps": 40}


def test_the_summary_is_a_table_of_trials_that_says_how_each_ended():
    trials = [_trial("t1", 16, 100), _trial("t2", 64, 60, value=1.2), _trial("t3", 8, 20, "RuntimeError: x", None)]
    assert [trial_status(t) for t in trials] == ["finished", "stopped early at step 60", "failed"]
    out = io.StringIO()
    print_summary(make_console(file=out), _outcome(trials), "val_loss")
    lines = out.getvalue().splitlines()
    header = next(line for line in lines if "┃ trial" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == [
        "trial", "rank", "alpha", "lr", "cycles", "val_loss", "steps", "reused", "status"]
    row = next(line for line in lines if "r64-" in line)
    assert "stopped early at step 60" in row and "60/100" in row and "2.1e-3" in row
    assert any("r16-a96-lr2.1e-3-c1 ★" in line and "finished" in line for line in lines)
    assert "best trial r16-a96-lr2.1e-3-c1 (t1): val_loss=1" in out.getvalue()
    at = lines.index("checkpoints: runs/x")  # the sweep's disk use right after where its checkpoints are
    assert lines[at + 1] == "disk: 3.0 MiB in runs/x, 2 transformer weight files (checkpoints: keep needed)"


def test_piped_output_is_wide_so_table_rows_never_wrap():
    assert make_console(file=io.StringIO()).width == PIPE_WIDTH
    long = [_trial(f"t{i}", 2 ** i, 100) for i in range(1, 4)]
    for t in long:
        t["config"]["stages.lora.adapter.target_modules"] = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2" * 2
    out = io.StringIO()
    print_summary(make_console(file=out), _outcome(long), "val_loss")
    rows = [line for line in out.getvalue().splitlines() if line.startswith("│")]
    assert len(rows) == 3  # one line per trial


def test_models_list_and_plugins_speak_json(tmp_path, cli_env):
    listed = run_cli(["models", "list", "--json", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"], cwd=tmp_path,
                     env=cli_env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    assert "Creating initial MLflow database tables" not in listed.stderr  # MLflow's set-up lines stay quiet
    plugins = run_cli(["plugins", "--all", "--json"], cwd=tmp_path, env=cli_env, timeout=120)
    assert plugins.returncode == 0 and any(p["builtin"] for p in json.loads(plugins.stdout))


def test_the_demo_tries_every_rank_it_lists():
    from fluxtune.config.load import load_search_file
    from fluxtune.search.space import grid_size, sample_configs

    spec, base = load_search_file(str(REPO / "searches" / "lora_rank.yaml"))
    search = spec.search
    ranks = search.space["stages.lora.adapter.rank"].choices
    assert search.sampler.type == "grid" and search.num_samples == grid_size(search) and len(ranks) >= 3
    tried = {c["stages.lora.adapter.rank"] for c in sample_configs(search, base, search.num_samples)}
    assert tried == set(ranks)
    assert Path(REPO / "searches" / "lora_rank.yaml").read_text().count("num_samples") == 1


def test_library_chatter_is_hidden_by_default_and_shown_with_verbose(monkeypatch):
    import io
    import logging
    import sys
    import warnings

    from fluxtune.cli.console import quiet_libraries

    stderr, stdout, shown = io.StringIO(), io.StringIO(), []
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    quiet_libraries()
    try:
        print("Successfully registered model 'flux-fill-lora'.", file=sys.stderr)  # MLflow prints these
        print("error: something fluxtune says", file=sys.stderr)
        print("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started", file=sys.stdout)
        print("r16-a96 started (100 steps)", file=sys.stdout)
        with warnings.catch_warnings():  # MLflow's own "once" filter: only the display can drop it
            warnings.simplefilter("once", UserWarning)
            warnings.warn("\x1b[33mAdd type hints to the `predict` method to enable data validation")
            warnings.warn("a warning worth reading")
        assert stderr.getvalue() == "error: something fluxtune says\n"
        assert stdout.getvalue() == "r16-a96 started (100 steps)\n"
        assert shown == ["a warning worth reading"]
        assert logging.getLogger("mlflow").level == logging.WARNING
        assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"  # for MLflow imported later, and Ray workers
    finally:
        quiet_libraries(verbose=True)
    assert sys.stderr is stderr and sys.stdout is stdout and "MLFLOW_LOGGING_LEVEL" not in os.environ
    assert logging.getLogger("mlflow").level == logging.NOTSET
