"""config: search.toml + overrides -> one validated Config."""

from __future__ import annotations

from pathlib import Path

import pytest

from fer_search.config import Config, FloatRange, load_config
from fer_search.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "search.toml"
    path.write_text(text)
    return path


def test_shipped_search_toml_equals_the_defaults() -> None:
    shipped = load_config(REPO / "search.toml")
    expected = Config()
    for section in ("run", "pruner", "space"):
        assert getattr(shipped, section) == getattr(expected, section)
    assert shipped.study.name == expected.study.name
    assert shipped.study.storage == f"sqlite:///{REPO}/studies/fer2013.db"
    assert shipped.data.path == REPO / "data" / "fer2013"
    assert shipped.finalize == expected.finalize


def test_relative_paths_follow_the_file_not_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, '[data]\npath = "faces"\n[study]\nstorage = "sqlite:///s/x.db"\n')
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.data.path == tmp_path / "faces"
    assert config.study.storage == f"sqlite:///{tmp_path}/s/x.db"
    assert config.study.artifacts == tmp_path / "studies" / "artifacts"


def test_overrides_win_and_are_relative_to_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    path = write(tmp_path, "[run]\ntrials = 7\nepochs = 3\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(path, {"run.trials": 9, "data.path": Path("other")})
    assert (config.run.trials, config.run.epochs) == (9, 3)
    assert config.data.path == tmp_path / "other"


def test_space_forms(tmp_path: Path) -> None:
    path = write(tmp_path, "[space]\nlr = 0.001\nbatch_size = 64\nwidth = [1.0, 2.0]\n"
                           "dropout_high = {low = 0.2, high = 0.5}\n")
    space = load_config(path).space
    assert space.lr == 0.001
    assert space.batch_size == (64,)
    assert space.width == (1.0, 2.0)
    assert space.dropout_high == FloatRange(0.2, 0.5, False)


@pytest.mark.parametrize("text, named", [
    ("[run]\ntrials = 0\n", "run.trials"),
    ("[run]\ntrails = 5\n", "run.trails"),
    ("[runs]\ntrials = 5\n", "[runs]"),
    ("[run]\nepochs = \"ten\"\n", "run.epochs"),
    ("[run]\ndevice = \"gpu\"\n", "run.device"),
    ("[space]\nlr = {low = 0.01, high = 0.001}\n", "space.lr"),
    ("[space]\nlr = {low = 0.0, high = 0.001, log = true}\n", "space.lr"),
    ("[space]\nbatch_size = []\n", "space.batch_size"),
    ("[space]\ndropout_pattern = [\"sometimes\"]\n", "space.dropout_pattern"),
    ("[space]\ndropout_head = 1.5\n", "space.dropout_head"),
    ("[space]\nlinear_depth = [4]\n", "space.linear_depth"),
    ("[pruner]\nkind = \"sometimes\"\n", "pruner.kind"),
    ("[run]\nheartbeat_interval = 60\ngrace_period = 30\n", "run.grace_period"),
    ("[finalize]\nseeds = 0\n", "finalize.seeds"),
    ("[data]\nval_fraction = 1.5\n", "data.val_fraction"),
    ("not toml [", "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(UserError, match=None) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert named in message and "\n" not in message


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_bad_override_is_named() -> None:
    with pytest.raises(UserError, match="run.trials"):
        load_config(None, {"run.trials": 0})
