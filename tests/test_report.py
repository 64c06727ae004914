"""Finalize's reports: every file written, a self-contained page, the text tables, the summary finalize prints."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path

import optuna
import pytest
from finalizing import COMMAND, EPOCHS, REPORT_FILES, STUDY_NAME, Finalized, fake_inputs, toy_study

from fer_search.data import CLASSES
from fer_search.errors import UserError
from fer_search.report import write_reports
from fer_search.results import Commands, aggregate

FILES = list(REPORT_FILES)
FIGURES = [f for f in FILES if f.endswith(".png")]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def write(inputs: Finalized, out: Path, with_baseline: bool = True) -> list[Path]:
    return write_reports(out, inputs if with_baseline else dataclasses.replace(inputs, baseline=None))


@pytest.fixture(scope="module")
def inputs() -> Finalized:
    return fake_inputs(toy_study(n_complete=6, n_pruned=2))


@pytest.fixture(scope="module")
def written(inputs: Finalized, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write(inputs, tmp_path_factory.mktemp("final") / "final")


def test_every_file_is_written_and_returned(written: list[Path]) -> None:
    assert [p.name for p in written] == FILES
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    assert not [p for p in written[0].parent.iterdir() if p.name not in FILES]  # no temporary files left


def test_page_is_self_contained_with_every_figure(written: list[Path]) -> None:
    page = (written[0].parent / "report.html").read_text()
    for external in ('src="http', "src='http", 'href="http', "<link", "<script", "@import", "url("):
        assert external not in page
    for name in FIGURES:
        png = (written[0].parent / name).read_bytes()
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page


def test_page_has_the_key_numbers(written: list[Path], inputs: Finalized) -> None:
    page = (written[0].parent / "report.html").read_text()
    m = inputs.metrics
    for agg in (m.best, m.baseline):
        assert agg is not None and agg.std is not None
        assert f"{agg.mean.private_test.accuracy:.2%} ± {agg.std.private_test.accuracy:.2%}" in page
        assert f"{agg.mean.private_test.macro_f1:.3f} ± {agg.std.private_test.macro_f1:.3f}" in page
        assert f"{agg.mean.test_all.accuracy:.2%}" in page
    assert "61.356%: reported by the documented project, on its own split" in page
    assert page.count("61.356") == 1
    assert "includes the validation split (PublicTest)" in page
    assert "Best trial #3" in page and "65.43%" in page
    baseline_trial = inputs.study.trials[2]
    assert f"Baseline: trial #2, PublicTest accuracy {baseline_trial.value:.2%}" in page
    assert "(shipped)" in page and "baseline" in page
    assert all(c in page for c in CLASSES)
    assert "<td>version of optuna</td><td>5.0.0</td>" in page and "ccc333" in page and "0123abc" in page
    assert "<td>lr</td><td>0.0021</td><td>0.001</td>" in page and "<td>dropout_low</td><td>— (unused)</td>" in page
    assert "COMPLETE</td><td>6<" in page and "PRUNED</td><td>2<" in page


def test_page_escapes_what_it_interpolates(written: list[Path]) -> None:
    page = (written[0].parent / "report.html").read_text()
    assert STUDY_NAME not in page and "fer&lt;2013&gt;&amp;co" in page
    assert "fer-search finalize --study &#x27;fer&lt;2013&gt;&amp;co&#x27; --seeds 3" in page
    assert "fer-search run --trials 8 --study &#x27;fer&lt;2013&gt;&amp;co&#x27;" in page


def test_page_says_when_the_study_did_not_record_its_run_command(inputs: Finalized, tmp_path: Path) -> None:
    metrics = dataclasses.replace(inputs.metrics, commands=Commands(run=None, finalize=COMMAND))
    write(dataclasses.replace(inputs, metrics=metrics), tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "not recorded" in page and "fer-search finalize --study" in page


def test_text_and_json(written: list[Path], inputs: Finalized) -> None:
    folder = written[0].parent
    text = (folder / "recalls_precisions.txt").read_text()
    assert all(c in text for c in CLASSES)
    assert "Baseline (the documented configuration" in text and "± " in text
    support = inputs.shipped.private_test.per_class["happy"].support
    assert any(line.split()[:1] == ["happy"] and line.split()[-1] == str(support) for line in text.splitlines())
    epochs = json.loads((folder / "epoch_accs.json").read_text())
    assert [h["val_acc"] for h in epochs["best"]] == [h["val_acc"] for h in inputs.shipped.history]
    assert len(epochs["baseline"]) == EPOCHS and {"train_acc", "val_loss", "lr"} <= epochs["baseline"][0].keys()


def test_without_baseline(inputs: Finalized, tmp_path: Path) -> None:
    no_baseline = dataclasses.replace(inputs, metrics=dataclasses.replace(inputs.metrics, baseline=None))
    written = write(no_baseline, tmp_path, with_baseline=False)
    assert [p.name for p in written] == FILES
    page = (tmp_path / "report.html").read_text()
    assert "not retrained" in page and "baseline (seed" not in page and "the baseline were" not in page
    assert json.loads((tmp_path / "epoch_accs.json").read_text())["baseline"] is None
    assert "Baseline (the documented configuration" not in (tmp_path / "recalls_precisions.txt").read_text()


def test_an_unwritable_folder_is_a_user_error_naming_it(inputs: Finalized, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=re.escape(str(blocker / "final"))):
        write(inputs, blocker / "final")


def test_one_seed_has_no_std(inputs: Finalized, tmp_path: Path) -> None:
    one_seed = dataclasses.replace(
        inputs.metrics,
        seeds=[inputs.shipped.seed],
        best=aggregate([inputs.shipped]),
        baseline=aggregate([inputs.baseline]),
    )
    write(dataclasses.replace(inputs, metrics=one_seed), tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert "±" not in page and f"seed {inputs.shipped.seed} only, no spread" in page
    assert "±" not in (tmp_path / "recalls_precisions.txt").read_text()


def test_a_study_without_complete_trials_still_gets_every_file(inputs: Finalized, tmp_path: Path) -> None:
    written = write(dataclasses.replace(inputs, study=toy_study(n_complete=0)), tmp_path)
    assert [p.name for p in written] == FILES
    page = (tmp_path / "report.html").read_text()
    assert "The baseline has no complete trial in this study." in page and "PRUNED</td><td>1<" in page


def test_a_study_optuna_cannot_plot_still_gets_every_file(inputs: Finalized, tmp_path: Path) -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=3)
    assert [p.name for p in write(dataclasses.replace(inputs, study=study), tmp_path)] == FILES
