"""config: search.toml + overrides -> one validated Config."""

from __future__ import annotations

import math
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


STUDY_NAME_RULE = (
    "must be 1 to 100 printable characters without '/', '\\' or '..', "
    "not starting with '.' or '-', nor starting or ending with a space"
)


# (file text or command-line overrides, the key or section named, the value shown): every message is
# one line that starts with the file or "command line" and names the key and its value (a file that
# is not TOML: where it breaks).
@pytest.mark.parametrize(
    "source, named, shown",
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
            "= {'low': 0.0, 'high': 0.001, 'log': False}: 0.0 must be a finite number > 0",
        ),
        ("[space]\nbatch_size = []\n", "space.batch_size", "= []"),
        ("[space]\nbatch_size = [0, 32]\n", "space.batch_size", "= [0, 32]: 0 must be an integer in [1, 2048]"),
        (
            "[space]\nbatch_size = [64, 4096]\n",
            "space.batch_size",
            "= [64, 4096]: 4096 must be an integer in [1, 2048]",
        ),
        ("[space]\nwidth = [0.0, 1.0]\n", "space.width", "= [0.0, 1.0]: 0.0 must be a number in [0.03125, 4]"),
        ("[space]\nwidth = [1.0, 8.0]\n", "space.width", "= [1.0, 8.0]: 8.0 must be a number in [0.03125, 4]"),
        ("[space]\nwidth = [1.0, inf]\n", "space.width", "= [1.0, inf]: expected a finite number"),
        ("[space]\nconvs_per_block = [1, 10]\n", "space.convs_per_block", "= [1, 10]: 10 must be an integer in [1, 4]"),
        ('[space]\ndropout_pattern = ["sometimes"]\n', "space.dropout_pattern", "= ['sometimes']"),
        ("[space]\ndropout_head = 1.5\n", "space.dropout_head", "= 1.5: 1.5 must lie in [0, 1)"),
        ("[space]\ndropout_low = nan\n", "space.dropout_low", "= nan: expected a finite number"),
        ("[space]\nlr = {low = 1e-4, high = inf}\n", "space.lr", "'high': inf}: expected a finite number"),
        ("[space]\ndropout_high = {low = 0.3, high = 1.0}\n", "space.dropout_high", "'high': 1.0"),
        ("[space]\nlinear_depth = [4]\n", "space.linear_depth", "= [4]"),
        ('[pruner]\nkind = "sometimes"\n', "pruner.kind", "= 'sometimes'"),
        ("[pruner]\nreduction_factor = 1\n", "pruner.reduction_factor", "= 1: must be >= 2"),
        ("[pruner]\npercentile = 0\n", "pruner.percentile", "= 0.0: must lie in (0, 100)"),
        ("[pruner]\nmin_delta = -0.5\n", "pruner.min_delta", "= -0.5: must be >= 0"),
        (
            "[run]\nheartbeat_interval = 60\ngrace_period = 30\n",
            "run.grace_period",
            "= 30: must exceed run.heartbeat_interval = 60",
        ),
        ("[finalize]\nseeds = 0\n", "finalize.seeds", "= 0"),
        ("[finalize]\njobs = 0\n", "finalize.jobs", "= 0: must be >= 1"),
        ("[finalize]\ntop_k = 0\n", "finalize.top_k", "= 0: must be >= 1"),
        ("[finalize]\nselection_seeds = 0\n", "finalize.selection_seeds", "= 0: must be >= 1"),
        ("[finalize]\nflip = 'sometimes'\n", "finalize.flip", "= 'sometimes': not one of auto, on, off"),
        ("[finalize]\nensemble = 1\n", "finalize.ensemble", "expected true or false"),
        ("[data]\nval_fraction = 1.5\n", "data.val_fraction", "= 1.5"),
        ('[study]\nname = "a/b"\n', "study.name", f"= 'a/b': {STUDY_NAME_RULE}"),
        ("not toml [", "not valid TOML", "line 1"),
        # Every number finite and within what its use takes, from the file and the command line alike.
        ("[run]\ntimeout = nan\n", "run.timeout", "= nan: expected a finite number"),
        ({"run.timeout": math.nan}, "run.timeout", "= nan: expected a finite number"),
        ({"run.timeout": -math.inf}, "run.timeout", "= -inf: expected a finite number"),
        ("[run]\ntimeout = 1e12\n", "run.timeout", "= 1000000000000.0: must be <= 31536000"),
        ("[run]\nwait_poll_s = 1e300\n", "run.wait_poll_s", "= 1e+300: must be <= 31536000"),
        ({"run.wait_poll_s": 1e300}, "run.wait_poll_s", "= 1e+300: must be <= 31536000"),
        ("[run]\ncheckpoint_every_s = 1e100\n", "run.checkpoint_every_s", "= 1e+100: must be <= 31536000"),
        ("[run]\nready_timeout_s = 1e100\n", "run.ready_timeout_s", "= 1e+100: must be <= 31536000"),
        ("[run]\nheartbeat_interval = 10000000000\n", "run.heartbeat_interval", "= 10000000000: must be <= 31536000"),
        ("[run]\ngrace_period = 10000000000\n", "run.grace_period", "= 10000000000: must be <= 31536000"),
        ("[run]\nseed = 4294967296\n", "run.seed", "= 4294967296: must be <= 4294967295"),
        ({"run.seed": 10**30}, "run.seed", f"= {10**30}: must be <= 4294967295"),
        ("[run]\nseed = -1\n", "run.seed", "= -1: must be >= 0"),
        ("[data]\nsplit_seed = 4294967296\n", "data.split_seed", "= 4294967296: must be <= 4294967295"),
        ({"data.split_seed": -1}, "data.split_seed", "= -1: must be >= 0"),
        ("[run]\nworkers = 33\n", "run.workers", "= 33: must be <= 32"),
        ({"run.workers": 1000}, "run.workers", "= 1000: must be <= 32"),
        ("[run]\nfuse = 33\n", "run.fuse", "= 33: must be <= 32"),
        ({"run.fuse": 0}, "run.fuse", "= 0: must be >= 1"),
        # A study name is a safe file name.
        ('[study]\nname = "../x"\n', "study.name", f"= '../x': {STUDY_NAME_RULE}"),
        ({"study.name": "../x"}, "study.name", f"= '../x': {STUDY_NAME_RULE}"),
        ({"study.name": "a..b"}, "study.name", "= 'a..b'"),
        ({"study.name": ".hidden"}, "study.name", "= '.hidden'"),
        ({"study.name": "-rf"}, "study.name", "= '-rf'"),
        ({"study.name": ""}, "study.name", "= ''"),
        ({"study.name": " ab"}, "study.name", "= ' ab'"),
        ({"study.name": "a\\b"}, "study.name", "= 'a\\\\b'"),
        ({"study.name": "a\nb"}, "study.name", "= 'a\\nb'"),
        ('[study]\nname = "a\\tb"\n', "study.name", "= 'a\\tb'"),
        ({"study.name": "ab\u200b"}, "study.name", "= 'ab\\u200b'"),  # a zero-width space
        ({"study.name": "x" * 101}, "study.name", "= 'xxx"),
    ],
)
def test_bad_config_names_the_file_key_and_value(
    tmp_path: Path, source: str | dict[str, object], named: str, shown: str
) -> None:
    path = write(tmp_path, source if isinstance(source, str) else "")
    with pytest.raises(UserError) as info:
        load_config(path, None if isinstance(source, str) else source)
    message = str(info.value)
    where = f"{path}: " if isinstance(source, str) else "command line: "
    assert message.startswith(where) and named in message and shown in message and "\n" not in message


@pytest.mark.parametrize("name", ["a" + "-._9Z" * 19 + "abcz", "fer 2013 caf\u00e9 (w=2)", "x-y_z.1"])
def test_names_of_safe_files_are_accepted(tmp_path: Path, name: str) -> None:
    """Up to 100 characters, spaces and any script's letters: studies named before the rule stay reachable."""
    assert load_config(write(tmp_path, ""), {"study.name": name}).study.name == name


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


@pytest.mark.parametrize(
    "args, line",
    [
        (["run", "--trials", "0"], "run.trials = 0: must be >= 1"),
        (["run", "--timeout", "nan"], "run.timeout = nan: expected a finite number"),
        (["run", "--seed", str(2**64)], f"run.seed = {2**64}: must be <= 4294967295"),
        (["run", "--workers", "100"], "run.workers = 100: must be <= 32"),
        (["status", "--study", "../x"], f"study.name = '../x': {STUDY_NAME_RULE}"),
        (["finalize", "--study", "a/../../etc"], f"study.name = 'a/../../etc': {STUDY_NAME_RULE}"),
    ],
)
def test_bad_value_on_the_command_line_exits_2_with_one_line(tmp_path: Path, args: list[str], line: str) -> None:
    path = write(tmp_path, "[run]\nepochs = 3\n")
    result = CliRunner().invoke(main, [*args, "--config", str(path)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: command line: {line}"]
