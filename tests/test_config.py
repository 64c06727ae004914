"""config: search.toml + overrides -> one validated Config."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fer_search.cli import main
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
    path = write(
        tmp_path, "[space]\nlr = 0.001\nbatch_size = 64\nwidth = [1.0, 2.0]\ndropout_high = {low = 0.2, high = 0.5}\n"
    )
    space = load_config(path).space
    assert space.lr == 0.001
    assert space.batch_size == (64,)
    assert space.width == (1.0, 2.0)
    assert space.dropout_high == FloatRange(0.2, 0.5, False)


# (file text, the key or section named, the value shown): every message is one line that starts
# with the file and names the key and its value (a file that is not TOML: where it breaks).
@pytest.mark.parametrize(
    "text, named, shown",
    [
        ("[run]\ntrials = 0\n", "run.trials", "= 0: must be >= 1"),
        ("[run]\ntrails = 5\n", "run.trails", "= 5"),
        ("[runs]\ntrials = 5\n", "[runs]", "[runs]"),
        ('[run]\nepochs = "ten"\n', "run.epochs", "= 'ten'"),
        ('[run]\ndevice = "gpu"\n', "run.device", "= 'gpu'"),
        ("[run]\ntimeout = -1\n", "run.timeout", "= -1.0: must be >= 0"),
        ("[run]\ncheckpoint_every_s = -1\n", "run.checkpoint_every_s", "= -1.0: must be >= 0"),
        ("[run]\nready_timeout_s = -5\n", "run.ready_timeout_s", "= -5.0: must be >= 0"),
        ("[run]\nwait_poll_s = -1\n", "run.wait_poll_s", "= -1.0: must be > 0"),
        ("[run]\nwait_poll_s = 0\n", "run.wait_poll_s", "= 0.0: must be > 0"),
        ("[space]\nlr = {low = 0.01, high = 0.001}\n", "space.lr", "'low': 0.01, 'high': 0.001"),
        ("[space]\nlr = {low = 0.0, high = 0.001, log = true}\n", "space.lr", "'low': 0.0"),
        (
            "[space]\nlr = {low = 0.0, high = 0.001}\n",
            "space.lr",
            "= {'low': 0.0, 'high': 0.001, 'log': False}: must be > 0",
        ),
        ("[space]\nbatch_size = []\n", "space.batch_size", "= []"),
        ("[space]\nbatch_size = [0, 32]\n", "space.batch_size", "= [0, 32]: values must be >= 1"),
        ("[space]\nwidth = [0.0, 1.0]\n", "space.width", "= [0.0, 1.0]"),
        ('[space]\ndropout_pattern = ["sometimes"]\n', "space.dropout_pattern", "= ['sometimes']"),
        ("[space]\ndropout_head = 1.5\n", "space.dropout_head", "= 1.5: dropout must lie in [0, 1)"),
        ("[space]\ndropout_high = {low = 0.3, high = 1.0}\n", "space.dropout_high", "'high': 1.0"),
        ("[space]\nlinear_depth = [4]\n", "space.linear_depth", "= [4]"),
        ('[pruner]\nkind = "sometimes"\n', "pruner.kind", "= 'sometimes'"),
        ("[pruner]\nreduction_factor = 1\n", "pruner.reduction_factor", "= 1: must be >= 2"),
        ("[pruner]\npercentile = 0\n", "pruner.percentile", "= 0.0: must lie in (0, 100)"),
        (
            "[run]\nheartbeat_interval = 60\ngrace_period = 30\n",
            "run.grace_period",
            "= 30: must exceed run.heartbeat_interval = 60",
        ),
        ("[finalize]\nseeds = 0\n", "finalize.seeds", "= 0"),
        ("[finalize]\njobs = 0\n", "finalize.jobs", "= 0: must be >= 1"),
        ("[data]\nval_fraction = 1.5\n", "data.val_fraction", "= 1.5"),
        ('[study]\nname = "a/b"\n', "study.name", "= 'a/b'"),
        ("not toml [", "not valid TOML", "line 1"),
    ],
)
def test_bad_config_names_the_file_key_and_value(tmp_path: Path, text: str, named: str, shown: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and named in message and shown in message and "\n" not in message


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")


def test_bad_override_names_the_command_line_even_with_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[run]\ntrials = 7\n")
    with pytest.raises(UserError) as info:
        load_config(path, {"run.trials": 0})
    assert str(info.value) == "command line: run.trials = 0: must be >= 1"


def test_a_check_of_two_keys_says_where_each_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, "[run]\nheartbeat_interval = 200\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value) == f"defaults: run.grace_period = 120: must exceed run.heartbeat_interval = 200 ({path})"


def test_bad_value_on_the_command_line_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[run]\nepochs = 3\n")
    result = CliRunner().invoke(main, ["run", "--config", str(path), "--trials", "0"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: command line: run.trials = 0: must be >= 1"]
