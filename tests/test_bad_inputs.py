"""The bad-input catalogue: every case goes through the real `fluxtune` entry point and must end with exit code 2,
one `error:` line per problem naming the culprit (file:line, key, row or plugin), no traceback, and nothing written.

Spec-only problems run `fluxtune validate` and `fluxtune search` (both must refuse); data and model problems run
`fluxtune search` (or `fluxtune data check`), which must refuse in preflight, before Ray. These run in-process
through `fluxtune.cli.main.main` (a subprocess costs ≈3 s each); plugin problems need a fresh interpreter to
discover entry points, so they run the console script with fake-installed distributions on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from conftest import run_cli, run_in_process

GOOD = """\
name: bad-inputs
base:
  data: {jsonl: data.jsonl, resolution: 32, batch_size: 2, val_fraction: 0.5}
  cycles: 1
  stages:
    - {name: full, type: full, steps: 2}
    - name: lora
      type: lora
      steps: 2
      adapter: {type: lora, rank: 4}
search:
  num_samples: 2
  space:
    stages.lora.adapter.rank: {type: categorical, choices: [4, 8]}
"""
ROWS = 8


def write_dataset(folder: Path, rows: int = ROWS, size: tuple[int, int] = (32, 32)) -> list[dict]:
    """`rows` good examples (distinct targets, so the hash split gives both sides rows); returns the records."""
    Image.new("RGB", size, (90, 120, 30)).save(folder / "image.png")
    Image.new("L", size, 255).save(folder / "mask.png")
    records = []
    for i in range(rows):
        Image.new("RGB", size, (i * 20, 0, 0)).save(folder / f"target{i}.png")
        records.append({"user_input": {"image": "image.png", "mask": "mask.png"}, "output": f"target{i}.png"})
    write_jsonl(folder / "data.jsonl", records)
    return records


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def fake_install(site: Path, dist: str, entry: str, code: str) -> None:
    """An installed distribution as importlib.metadata sees one: module + `*.dist-info` with entry_points.txt."""
    module = dist.replace("-", "_")
    (site / module).mkdir(parents=True)
    (site / module / "__init__.py").write_text(textwrap.dedent(code))
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[fluxtune]\n{entry} = {module}\n")


def sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)
    return edit


@dataclass
class Case:
    id: str
    culprit: str | tuple[str, ...]  # must appear in the error line (every one of them); `{line}` is the 1-based
    # line of `mark` in the edited YAML, matched with or without the column after it
    edit: Callable[[str], str] = lambda text: text
    mark: str = ""
    commands: tuple[tuple[str, ...], ...] = (("validate",), ("search",))
    data: Callable[[Path], object] | None = None  # writes the (bad) dataset instead of the good one
    site: Callable[[Path], None] | None = None  # fake-installs plugins: runs the console script in a subprocess
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()  # extra arguments after the spec


def bad_row(record_edit: Callable[[dict], object], line: int = 3) -> Callable[[Path], None]:
    def data(folder: Path) -> None:
        lines = [json.dumps(r) for r in write_dataset(folder)]
        record = json.loads(lines[line - 1])
        edited = record_edit(record)
        lines[line - 1] = edited if isinstance(edited, str) else json.dumps(edited)
        write_jsonl(folder / "data.jsonl", lines)
    return data


def mask_of_size(folder: Path) -> None:
    write_dataset(folder)
    Image.new("L", (48, 48), 255).save(folder / "mask48.png")
    bad_row(lambda r: {**r, "user_input": {"image": "image.png", "mask": "mask48.png"}})(folder)


def undecodable(folder: Path) -> None:
    write_dataset(folder)
    (folder / "cut.png").write_bytes((folder / "target0.png").read_bytes()[:60])  # header fine, pixels cut off
    bad_row(lambda r: {**r, "output": "cut.png"})(folder)


def model_folder(in_channels: int, out_channels: int | None = None) -> Callable[[Path], None]:
    def data(folder: Path) -> None:
        write_dataset(folder)
        from fluxtune.flux.presets import TINY_FILL_TRANSFORMER

        (folder / "model" / "transformer").mkdir(parents=True)
        (folder / "model" / "vae").mkdir()
        config = {"_class_name": "FluxTransformer2DModel", **TINY_FILL_TRANSFORMER, "in_channels": in_channels,
                  "out_channels": out_channels}
        (folder / "model" / "transformer" / "config.json").write_text(json.dumps(config))
    return data


def all_black_mask(folder: Path) -> None:
    write_dataset(folder)
    Image.new("L", (32, 32), 0).save(folder / "black.png")
    bad_row(lambda r: {**r, "user_input": {"image": "image.png", "mask": "black.png"}})(folder)


def hole_outside_the_crop(folder: Path) -> None:
    """A wide image whose mask marks only its left edge: the centre-square crop at 32 px cuts the hole away."""
    write_dataset(folder)
    Image.new("RGB", (96, 32)).save(folder / "wide.png")
    hole = Image.new("L", (96, 32), 0)
    hole.paste(255, (0, 0, 16, 32))
    hole.save(folder / "edge_mask.png")
    bad_row(lambda r: {"user_input": {"image": "wide.png", "mask": "edge_mask.png"}, "output": "wide.png"})(folder)


def billion_laughs(text: str) -> str:
    lines = ['lol0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    return text + "\n".join(lines) + "\n"


def plugin(dist: str, entry: str, code: str) -> Callable[[Path], None]:
    return lambda site: fake_install(site, dist, entry, code)


REGISTERS_FOCAL = """
    import fluxtune

    @fluxtune.hookimpl
    def register_losses(register):
        register("focal", lambda params: None, doc="a loss two plugins both claim")
"""


def two_plugins_claim_focal(site: Path) -> None:
    fake_install(site, "fluxtune-focal-a", "focal_a", REGISTERS_FOCAL)
    fake_install(site, "fluxtune-focal-b", "focal_b", REGISTERS_FOCAL)


SPEC = "sweep.yaml"
SEARCH = (("search",),)
CASES = [
    # YAML itself
    Case("yaml-syntax", f"{SPEC}:{{line}}", sub("    - {name: full, type: full, steps: 2}", "    - {name: full, type: full"),
         mark="- name: lora"),
    Case("yaml-duplicate-key", f"{SPEC}:{{line}}", sub("  cycles: 1\n", "  cycles: 1\n  cycles: 2\n"), mark="cycles: 2"),
    Case("yaml-python-tag", f"{SPEC}:{{line}}:11: YAML tag '!!python/object/apply:os.system' is not allowed",
         sub("  cycles: 1", "  cycles: !!python/object/apply:os.system [echo]"), mark="cycles"),
    Case("yaml-not-a-mapping", SPEC, lambda text: "- just\n- a list\n"),
    Case("yaml-empty-file", f"{SPEC}:", lambda text: ""),
    Case("yaml-latin-1-comment", f"{SPEC}:{{line}}:8: not UTF-8 text: byte 0xe9",
         lambda text: text.replace("  cycles: 1", "  # caf\xe9\n  cycles: 1").encode("latin-1"), mark="# caf"),
    Case("yaml-binary", f"{SPEC}: binary file", lambda text: b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff"),
    Case("yaml-control-character", f"{SPEC}:1:10: character", sub("name: bad-inputs", "name: bad\x07inputs")),
    Case("yaml-billion-laughs", (f"{SPEC}:{{line}}", "expands to more than 100,000 values"), billion_laughs,
         mark="lol4:"),
    Case("yaml-nested-too-deep", f"{SPEC}:", lambda text: text + "deep: " + "[" * 3000 + "]" * 3000 + "\n"),
    Case("yaml-too-large", f"{SPEC}: larger than 1024 KiB", lambda text: text + "#" * (1 << 20) + "\n"),
    Case("not-a-spec-file", f"{SPEC}: not a fluxtune search or experiment file",
         lambda text: "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"),
    Case("spec-file-missing", "nowhere.yaml: file not found", commands=(("validate", "nowhere.yaml"),
                                                                               ("search", "nowhere.yaml"))),
    # unknown keys, wrong types, out of range
    Case("unknown-top-key", f"{SPEC}:{{line}}:1: colour: unknown key", sub("name:", "colour: red\nname:"), mark="colour"),
    Case("unknown-stage-param", f"{SPEC}:{{line}}:7: base.stages[1].stepz: unknown key",
         sub("      steps: 2\n      adapter", "      stepz: 2\n      steps: 2\n      adapter"), mark="stepz"),
    Case("unknown-adapter-param", f"{SPEC}:{{line}}: base.stages[1].adapter.rnak: unknown key",
         sub("rank: 4}", "rank: 4, rnak: 2}"), mark="rnak"),
    Case("wrong-type-cycles", f"{SPEC}:{{line}}:3: base.cycles:", sub("cycles: 1", "cycles: two"), mark="cycles"),
    Case("wrong-type-rank", f"{SPEC}:{{line}}: base.stages[1].adapter.rank:", sub("rank: 4}", "rank: big}"), mark="rank: big"),
    Case("resolution-not-multiple-of-16", f"{SPEC}:{{line}}: base.data.resolution: must be a positive multiple of 16",
         sub("resolution: 32", "resolution: 40"), mark="resolution"),
    Case("val-fraction-out-of-range", f"{SPEC}:{{line}}: base.data.val_fraction:", sub("val_fraction: 0.5", "val_fraction: 1.5"),
         mark="val_fraction"),
    Case("dropout-out-of-range", f"{SPEC}:{{line}}: base.stages[1].adapter.dropout:", sub("rank: 4}", "rank: 4, dropout: 1.0}"),
         mark="dropout"),
    Case("zero-steps", f"{SPEC}:{{line}}: base.stages[0].steps:", sub("steps: 2}", "steps: 0}"), mark="steps: 0"),
    Case("duplicate-stage-name", f"{SPEC}:{{line}}: base.stages: stage name 'full' is used twice",
         sub("    - name: lora", "    - name: full"), mark="stages:"),
    Case("bad-sweep-name", f"{SPEC}:1:1: name:", sub("name: bad-inputs", "name: bad inputs")),
    Case("model-preset-and-path", f"{SPEC}:{{line}}: base.model: give exactly one of",
         sub("  cycles: 1", "  model: {preset: tiny-fill, path: /m}\n  cycles: 1"), mark="model:"),
    Case("bad-set-value", "--set base.cycels=2: base.cycels: unknown key", args=("--set", "base.cycels=2")),
    Case("set-key-missing-from-the-file", "--set base.dataa.jsonl=x: base.dataa: unknown key",
         args=("--set", "base.dataa.jsonl=x")),
    Case("set-top-level-typo", ("--set data.jsonl=x: 'data' is not a top-level key", "did you mean base.data.jsonl?"),
         args=("--set", "data.jsonl=x")),
    Case("set-new-search-path", "--set search.space.no.such.path={type: int, low: 1, high: 2}: "
         "search.space.no.such.path: not a key of base",
         args=("--set", "search.space.no.such.path={type: int, low: 1, high: 2}")),
    Case("set-value-not-yaml", "--set base.cycles=[1: the value is not valid YAML", args=("--set", "base.cycles=[1")),
    Case("set-without-value", "--set base.cycles: expected KEY.PATH=VALUE", args=("--set", "base.cycles")),
    Case("set-into-a-value", "--set base.cycles.x=1: cannot set base.cycles.x: base.cycles is a value",
         args=("--set", "base.cycles.x=1")),
    Case("set-non-finite", "--set base.seed=.nan: base.seed: nan is not a finite number",
         args=("--set", "base.seed=.nan")),
    # numbers and names
    Case("infinite-search-bound",
         f"{SPEC}:{{line}}: search.space.stages.lora.optimizer.lr.high: inf is not a finite number",
         sub("    stages.lora.adapter.rank:",
             "    stages.lora.optimizer.lr: {type: float, low: 1.0e-5, high: .inf, log: true}\n"
             "    stages.lora.adapter.rank:"), mark="optimizer.lr"),
    Case("search-range-overflows", f"{SPEC}:{{line}}: search.space.model.guidance: low, high and step must be finite",
         lambda text: text + "    model.guidance: {type: float, low: -1.0e308, high: 1.0e308}\n", mark="guidance"),
    Case("integer-beyond-64-bits", f"{SPEC}:{{line}}: base.seed: integer out of range",
         sub("  cycles: 1", "  seed: 123456789012345678901234567890\n  cycles: 1"), mark="seed"),
    Case("experiment-name-is-a-path", f"{SPEC}:{{line}}: tracking.experiment: must be 1-100 letters",
         lambda text: text + "tracking: {experiment: ../../outside}\n", mark="tracking"),
    Case("model-name-is-a-path", "--set tracking.register_as=a/b: tracking.register_as: must be 1-100 letters",
         args=("--set", "tracking.register_as=a/b")),
    Case("stage-name-with-a-dot", f"{SPEC}:{{line}}: base.stages[0].name: must be 1-64 letters",
         sub("{name: full, type: full", "{name: full.1, type: full"), mark="full.1"),
    Case("alias-reserved", "--set tracking.alias=latest: tracking.alias: 'latest' is reserved",
         args=("--set", "tracking.alias=latest")),
    Case("secret-in-alias", "--set tracking.alias=***: tracking.alias: must not hold the value of $HF_TOKEN",
         args=("--set", "tracking.alias=hf_notreal0123456789"), env={"HF_TOKEN": "hf_notreal0123456789"}),
    Case("secret-in-experiment-name", f"{SPEC}:{{line}}: tracking.experiment: must not hold the value of $HF_TOKEN",
         lambda text: text + "tracking: {experiment: run-hf_notreal0123456789}\n", mark="tracking",
         env={"HF_TOKEN": "hf_notreal0123456789"}),
    # the search space
    Case("empty-choices", f"{SPEC}:{{line}}: search.space.stages.lora.adapter.rank.choices:",
         sub("choices: [4, 8]", "choices: []"), mark="choices"),
    Case("log-range-from-zero", f"{SPEC}:{{line}}: search.space.stages.lora.optimizer.lr: a log distribution needs low > 0",
         sub("    stages.lora.adapter.rank:", "    stages.lora.optimizer.lr: {type: float, low: 0, high: 0.1, log: true}\n"
             "    stages.lora.adapter.rank:"), mark="optimizer.lr"),
    Case("search-path-missing-from-base", f"{SPEC}:{{line}}: search.space.stages.lora.adapter.rnk: not a key of base",
         sub("adapter.rank:", "adapter.rnk:"), mark="rnk"),
    Case("search-path-unknown-stage", f"{SPEC}:{{line}}: search.space.stages.lorra.steps: not a key of base",
         sub("    stages.lora.adapter.rank:", "    stages.lorra.steps: {type: int, low: 1, high: 4}\n"
             "    stages.lora.adapter.rank:"), mark="lorra"),
    Case("searched-value-invalid", f"{SPEC}:{{line}}: search.space.stages.lora.adapter.rank: value 0 is invalid",
         sub("choices: [4, 8]", "choices: [0, 8]"), mark="adapter.rank:"),
    # unknown component names
    Case("unknown-stage-type", f"{SPEC}:{{line}}: base.stages[0].type: unknown stage 'ful'",
         sub("type: full,", "type: ful,"), mark="type: ful,"),
    Case("unknown-adapter", f"{SPEC}:{{line}}: base.stages[1].adapter.type: unknown adapter 'lorra' (available: lora)",
         sub("type: lora, rank", "type: lorra, rank"), mark="lorra"),
    Case("unknown-loss", f"{SPEC}:{{line}}: base.loss.type: unknown loss 'l3'",
         sub("  cycles: 1", "  loss: {type: l3}\n  cycles: 1"), mark="l3"),
    Case("unknown-timestep-sampler", f"{SPEC}:{{line}}: base.timesteps.type: unknown timestep_sampler 'gaussian'",
         sub("  cycles: 1", "  timesteps: {type: gaussian}\n  cycles: 1"), mark="gaussian"),
    Case("unknown-optuna-sampler", f"{SPEC}:{{line}}: search.sampler.type:",
         sub("  num_samples: 2", "  num_samples: 2\n  sampler: {type: bayes}"), mark="bayes"),
    Case("unknown-callback", f"{SPEC}:{{line}}: base.callbacks[0].type: unknown callback 'nan_gaurd'",
         sub("  cycles: 1", "  callbacks: [{type: nan_gaurd}]\n  cycles: 1"), mark="nan_gaurd"),
    Case("schedule-unknown-stage", f"{SPEC}:{{line}}: base.schedule.each[0]: no stage named 'lroa'",
         sub("  cycles: 1", "  schedule: {each: [lroa]}\n  cycles: 1"), mark="lroa"),
    # data (caught in preflight, before Ray)
    Case("jsonl-missing", f"{SPEC}:{{line}}: base.data.jsonl: data file 'data.jsonl' does not exist",
         data=lambda folder: None, mark="jsonl", commands=(("validate",), ("search",), ("search", "--dry-run", SPEC))),
    Case("val-jsonl-missing", f"{SPEC}:{{line}}: base.data.val_jsonl: data file 'val.jsonl' does not exist",
         sub("val_fraction: 0.5}", "val_jsonl: val.jsonl}"), mark="val_jsonl"),
    Case("jsonl-malformed", "data.jsonl:3: invalid JSON",
         data=bad_row(lambda r: json.dumps(r)[:-9]), commands=(("search",), ("data", "check", "data.jsonl"))),
    Case("jsonl-not-an-object", "data.jsonl:3: expected a JSON object, got array", data=bad_row(lambda r: [r]),
         commands=SEARCH),
    Case("jsonl-missing-key", "data.jsonl:3: missing key 'user_input.mask'",
         data=bad_row(lambda r: {**r, "user_input": {"image": "image.png"}}), commands=SEARCH),
    Case("image-missing", "data.jsonl:3: 'output' file not found",
         data=bad_row(lambda r: {**r, "output": "gone.png"}), commands=(("search",), ("data", "check", "data.jsonl"))),
    Case("image-undecodable", "data.jsonl:3: 'output' is not a readable image", data=undecodable, commands=SEARCH),
    Case("image-file-uri-missing", "data.jsonl:3: 'output' file not found: file:///nowhere/gone.png",
         data=bad_row(lambda r: {**r, "output": "file:///nowhere/gone.png"}),
         commands=(("search",), ("data", "check", "data.jsonl"))),
    Case("mask-all-black", "data.jsonl:3: 'user_input.mask' is empty: no pixel at or above mask_threshold 0.5",
         data=all_black_mask, commands=(("search",), ("data", "check", "data.jsonl"))),
    Case("mask-hole-outside-the-crop", "data.jsonl:3: 'user_input.mask' is empty after the training crop to 32x32",
         data=hole_outside_the_crop, commands=(("search",), ("data", "check", "data.jsonl", "--resolution", "32"))),
    Case("mask-size-mismatch", "data.jsonl:3: sizes disagree: image 32x32, mask 48x48, output 32x32",
         data=mask_of_size, commands=(("search",), ("data", "check", "data.jsonl"))),
    Case("dataset-empty", "data.jsonl: contains no examples",
         data=lambda folder: (folder / "data.jsonl").write_text("\n"), commands=SEARCH),
    Case("val-split-empty", f"{SPEC}:{{line}}: base.data.val_fraction: val_fraction 0.5 splits 1 rows",
         data=lambda folder: write_dataset(folder, rows=1), mark="val_fraction", commands=SEARCH),
    # the model
    Case("model-folder-missing", f"{SPEC}:{{line}}: base.model.path: model folder",
         sub("  cycles: 1", "  model: {path: no-such-model}\n  cycles: 1"), mark="model:", commands=SEARCH),
    Case("model-not-fill", f"{SPEC}:{{line}}: base.model.path: ",
         sub("  cycles: 1", "  model: {path: model}\n  cycles: 1"), mark="model:", data=model_folder(64),
         commands=SEARCH),
    Case("searched-model-folder-missing", f"{SPEC}:{{line}}: search.space.model.path: model folder",
         lambda text: sub("  cycles: 1", "  model: {path: model}\n  cycles: 1")(text)
         + "    model.path: {type: categorical, choices: [model, no-such-model]}\n", mark="model.path",
         data=model_folder(384, 64), commands=SEARCH),
    Case("prepare-model-folder-missing", "--model: model folder no-such-model does not exist",
         commands=(("data", "prepare", "data.jsonl", "--resolution", "32", "--model", "no-such-model"),)),
    Case("lora-target-missing", f"{SPEC}:{{line}}: base.stages[1].adapter.targets: LoRA targets ['proj_in'] match no "
         "Linear layer", sub("rank: 4}", "rank: 4, targets: [attn.to_q, proj_in]}"), mark="targets"),
    # plugins, discovered from (fake-)installed distributions
    Case("plugin-import-fails", "plugin 'broken' (fluxtune-broken 1.0): failed to import fluxtune_broken: "
         "ModuleNotFoundError", site=plugin("fluxtune-broken", "broken", "import a_module_that_is_not_installed\n")),
    Case("plugins-register-one-name-twice", ("loss 'focal' is registered by both plugin 'focal_",
                                             "'focal_a' (fluxtune-focal-a 1.0)", "'focal_b' (fluxtune-focal-b 1.0)"),
         site=two_plugins_claim_focal),
    Case("load-plugins-names-no-plugin", "FLUXTUNE_LOAD_PLUGINS: no installed plugin is named 'focal_c'",
         site=plugin("fluxtune-focal-a", "focal_a", REGISTERS_FOCAL), env={"FLUXTUNE_LOAD_PLUGINS": "focal_c"}),
]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A user's folder holding the spec and data, with the cache and MLflow store defaults pointing inside it."""
    work = tmp_path / "work"
    work.mkdir()
    for var in [v for v in os.environ if v.startswith(("MLFLOW_", "RAY_ADDRESS", "FLUXTUNE_"))]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("FLUXTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_line_naming_the_culprit(case: Case, workdir, tmp_path, monkeypatch, capsys):
    text = case.edit(GOOD)
    if isinstance(text, bytes):  # not UTF-8, or binary
        (workdir / SPEC).write_bytes(text)
        text = text.decode("latin-1")
    else:
        (workdir / SPEC).write_text(text)
    (case.data or write_dataset)(workdir)
    culprits = (case.culprit,) if isinstance(case.culprit, str) else case.culprit
    if case.mark:
        line = next(i for i, text_line in enumerate(text.splitlines(), 1) if case.mark in text_line)
        culprits = tuple(c.replace("{line}", str(line)) for c in culprits)
    env = {**os.environ, **case.env, "PYTHONDONTWRITEBYTECODE": "1"}
    if case.site:
        case.site(tmp_path / "site")
        # the fake site first; a PYTHONPATH already set (a checkout tested with an editable install elsewhere) after
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path / "site"), os.environ.get("PYTHONPATH")) if p)
    before = snapshot(tmp_path)

    for command in case.commands:
        args = [*command, *([SPEC] if command[-1] in ("validate", "search") else []), *case.args]
        if case.site:
            result = run_cli(args, workdir, env, timeout=120)
            code, err = result.returncode, result.stderr
        else:
            for name, value in case.env.items():
                monkeypatch.setenv(name, value)
            code, err = run_in_process(args, monkeypatch, capsys)
        shown = f"fluxtune {' '.join(args)} →\n{err}"
        assert code == 2, shown
        assert "Traceback" not in err, shown
        lines = err.rstrip("\n").splitlines()
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1, shown  # each case has one problem
        without_column = re.sub(rf"^error: ({re.escape(SPEC)}:\d+):\d+:", r"error: \1:", errors[0])
        assert all(c in errors[0] or c in without_column for c in culprits), shown
        # besides the error line, only the indented snippet of the offending YAML line (validate, --dry-run)
        shows_snippets = command == ("validate",) or "--dry-run" in command
        assert all(line.startswith("error: ") or (line.startswith("    ") and shows_snippets) for line in lines), shown
    assert snapshot(tmp_path) == before  # no runs/, no mlflow/, no latent cache, nothing half-written


def test_the_good_input_every_case_breaks_passes_preflight(workdir):
    from fluxtune.cli.preflight import preflight

    (workdir / SPEC).write_text(GOOD)
    write_dataset(workdir)
    checked = preflight(SPEC)
    assert checked.rows == ROWS and checked.base["stages"][1]["adapter"]["rank"] == 4
    model_folder(384, 64)(workdir)  # a Fill layout: its LoRA targets are checked on its config's modules
    assert preflight(SPEC, overrides=["base.model={path: model}"]).base["model"]["path"] == "model"


def test_the_catalogue_covers_the_issue():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
