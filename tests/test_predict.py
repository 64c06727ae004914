"""predict: load_model safety, conversion of any image, errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fer_search
from fer_search.cli import main
from fer_search.config import SpaceConfig
from fer_search.data import CLASSES
from fer_search.errors import UserError
from fer_search.model import BASELINE, build_model
from fer_search.predict import (
    MAX_MEMBERS,
    compact_state,
    load_model,
    mirrored,
    predict_images,
    save_model,
    stored_bytes,
)
from fer_search.train import logits_for

LIMIT = 16 * 2**20  # bytes: the most a model.pt may take, whatever the architecture


def model_path(finalized: Path) -> Path:
    return finalized / "studies" / "fer2013" / "final" / "model.pt"


def test_load_model_alone(finalized: Path) -> None:
    loaded = fer_search.load_model(model_path(finalized))
    assert loaded.classes == CLASSES
    assert not loaded.model.training
    assert loaded.meta["trial"] >= 0 and set(loaded.meta["seeds"]) <= {0, 1} and loaded.members == 1


def test_any_size_or_colour_is_converted(finalized: Path, tmp_path: Path) -> None:
    colour = tmp_path / "colour.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 80, 3), dtype=np.uint8)).save(colour)
    [p] = predict_images(load_model(model_path(finalized)), [colour])
    assert p.label in CLASSES and sum(p.probs.values()) == pytest.approx(1.0, abs=1e-4)


def test_cli_json_lines(finalized: Path, tiny_fer: Path) -> None:
    images = sorted(tiny_fer.glob("test/happy/*.jpg"))[:3]
    result = CliRunner().invoke(main, ["predict", "--model", str(model_path(finalized)), "--json", *map(str, images)])
    assert result.exit_code == 0
    docs = [json.loads(line) for line in result.output.splitlines()]
    assert [d["path"] for d in docs] == list(map(str, images))
    assert all(set(d["probs"]) == set(CLASSES) for d in docs)


def test_missing_model_says_run_finalize(tmp_path: Path, tiny_fer: Path) -> None:
    (tmp_path / "search.toml").write_text("")
    image = next(tiny_fer.glob("test/*/*.jpg"))
    result = CliRunner().invoke(main, ["predict", "--config", str(tmp_path / "search.toml"), str(image)])
    assert result.exit_code == 2 and "fer-search finalize" in result.output


@pytest.mark.parametrize("content, message", [(None, "cannot read image"), (b"this is text", "missing.jpg")])
def test_bad_image_is_named(finalized: Path, tmp_path: Path, content: bytes | None, message: str) -> None:
    image = tmp_path / "missing.jpg"
    if content is not None:
        image.write_bytes(content)
    result = CliRunner().invoke(main, ["predict", "--model", str(model_path(finalized)), str(image)])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_model_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"format": "fer-search-model/1", "x": Payload()}, evil)
    with pytest.raises(UserError, match="refusing"):
        load_model(evil)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(pickle.dumps("x")[:3])
    with pytest.raises(UserError, match="garbage.pt"):
        load_model(garbage)


def test_a_folder_given_as_the_model_is_named_a_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=re.escape(f"{tmp_path}: a folder, not a model file")):
        load_model(tmp_path)
    with pytest.raises(UserError, match=re.escape(f"model file not found: {tmp_path / 'nope.pt'}")):
        load_model(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "doc, message",
    [
        (b"hello, not a model\n", "not a readable model file"),
        ({"format": "fer-search-model/1"}, "damaged fer-search model file"),
        (
            {
                "format": "fer-search-model/1",
                "normalization": {"mean": 0.5, "std": 0.5},
                "classes": list(CLASSES),
                "params": {},
                "state_dict": {},
            },
            "damaged fer-search model file",
        ),
        (
            {
                "format": "fer-search-model/1",
                "normalization": {"mean": 0.5, "std": 0.5},
                "classes": list(CLASSES),
                "params": BASELINE.to_dict(),
                "state_dict": {"w": torch.zeros(1)},
            },
            "damaged fer-search model file",
        ),
        ({"something": "else"}, "not a fer-search model file"),
    ],
)
def test_a_damaged_model_file_is_one_line_exit_2(tmp_path: Path, tiny_fer: Path, doc: object, message: str) -> None:
    path = tmp_path / "model.pt"
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        torch.save(doc, path)
    line = predict_error(path, tiny_fer)
    assert message in line and str(path) in line


def predict_error(model: Path, tiny_fer: Path) -> str:
    """The one line `fer-search predict --model MODEL image` prints, having checked that it exits 2 with it alone."""
    result = CliRunner().invoke(main, ["predict", "--model", str(model), str(next(tiny_fer.glob("test/*/*.jpg")))])
    assert result.exit_code == 2, result.exception or result.output
    assert result.stdout == "" and "Traceback" not in result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ")
    return line


@pytest.fixture(scope="module")
def baseline_state() -> dict[str, torch.Tensor]:
    return build_model(BASELINE).state_dict()


def crafted_model(path: Path, state: dict[str, torch.Tensor], changes: dict[str, object]) -> Path:
    """The baseline's model.pt as finalize writes it, with `changes`: "key" replaces an entry, "params.x" a field."""
    doc: dict[str, Any] = {
        "format": "fer-search-model/2",
        "members": [state],
        "flip": False,
        "params": BASELINE.to_dict(),
        "classes": list(CLASSES),
        "normalization": {"mean": 0.5, "std": 0.5},
        "meta": {},
    }
    for key, value in changes.items():
        entry, _, field = key.partition(".")
        doc[entry] = {**doc[entry], field: value} if field else value
    torch.save(doc, path)
    return path


def refuse_to_build(*args: object, **kwargs: object) -> None:
    raise AssertionError("built a model from a file that the checks should have refused")


def test_the_crafted_baseline_itself_loads(tmp_path: Path, baseline_state: dict[str, torch.Tensor]) -> None:
    """So that each refusal below is its change's."""
    loaded = load_model(crafted_model(tmp_path / "model.pt", baseline_state, {}))
    assert loaded.params == BASELINE and loaded.classes == CLASSES


# (changes to a model file finalize would write, what the error names): each is refused in one
# line, before anything is built, so that a crafted file cannot allocate gigabytes, hang or raise a
# traceback. 10**5 classes stand for 10**7 (whose head would take gigabytes): unpickling 10**7
# names alone takes torch.load 20 s, whereas the count is refused at once.
@pytest.mark.parametrize(
    "changes, named",
    [
        ({"params.width": 1e6}, "width = 1000000.0: must be a number in [0.03125, 4]"),
        ({"params.convs_per_block": 10**6}, "convs_per_block = 1000000: must be an integer in [1, 4]"),
        ({"params.linear_depth": 0}, "linear_depth = 0: must be an integer in [1, 3]"),
        ({"params.width": "wide"}, "width = 'wide': must be a number"),
        ({"params.width": math.nan}, "width = nan: must be a number"),
        ({"params.width": 10**400}, "width = 1000"),
        ({"params.batch_size": True}, "batch_size = True: must be an integer"),
        ({"params.dropout_high": 5.0}, "dropout_high = 5.0: must lie in [0, 1)"),
        (
            {"params.dropout_pattern": "every", "params.dropout_high": None},
            "dropout_pattern 'every' needs dropout_high",
        ),
        ({"params.lr": -math.inf}, "lr = -inf: must be a finite number > 0"),
        ({"params": [1, 2]}, "params must be a dict of TrialParams fields, not a list of length 2"),
        ({"params": {}}, "dropout_pattern = None: must be one of"),
        ({"classes": [str(i) for i in range(10**5)]}, "classes must be FER2013's 7, not a list of length 100000"),
        ({"classes": list(reversed(CLASSES))}, "classes must be FER2013's in label order"),
        ({"classes": "angry"}, "classes must be FER2013's 7, not a str of length 5"),
        ({"members": [{0: torch.zeros(1)}]}, "state_dict[0] must be a tensor named by a string"),
        ({"members": [[torch.zeros(1)]]}, "state_dict must be a dict of tensors, not a list of length 1"),
        ({"members": []}, "members must be a list of 1 to 32 state_dicts, not a list of length 0"),
        ({"members": {"a": 1}}, "members must be a list of 1 to 32 state_dicts, not a dict of length 1"),
        ({"flip": "yes"}, "flip must be true or false, not a str of length 3"),
        ({"normalization": torch.zeros(2)}, "normalization must be {'mean': 0.5, 'std': 0.5}"),
        ({"meta": "x"}, "meta must be a dict, not a str of length 1"),
    ],
)
def test_a_model_file_outside_the_family_is_refused_before_building(
    tmp_path: Path,
    tiny_fer: Path,
    baseline_state: dict[str, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    changes: dict[str, object],
    named: str,
) -> None:
    monkeypatch.setattr("fer_search.predict.build_model", refuse_to_build)
    path = crafted_model(tmp_path / "model.pt", baseline_state, changes)
    line = predict_error(path, tiny_fer)
    assert line.startswith(f"error: {path}: ") and named in line


@pytest.mark.parametrize("tensor", [torch.zeros(3), torch.zeros(1).expand(10**6, 10**6)])  # the second: 4 TB if copied
def test_a_state_tensor_of_the_wrong_shape_is_named(
    tmp_path: Path, tiny_fer: Path, baseline_state: dict[str, torch.Tensor], tensor: torch.Tensor
) -> None:
    path = crafted_model(tmp_path / "model.pt", {**baseline_state, "block1.0.weight": tensor}, {})
    line = predict_error(path, tiny_fer)
    assert line.startswith(f"error: {path}: ") and "block1.0.weight" in line


def test_a_missing_model_file_says_finalize_writes_one(tmp_path: Path, tiny_fer: Path) -> None:
    image = next(tiny_fer.glob("test/*/*.jpg"))
    result = CliRunner().invoke(main, ["predict", "--model", str(tmp_path / "nope.pt"), str(image)])
    assert result.exit_code == 2 and "nope.pt" in result.output and "fer-search finalize" in result.output


def test_every_architecture_of_the_space_fits_in_16_mib(tmp_path: Path) -> None:
    space = SpaceConfig()
    sizes = {}
    for pattern, width, convs, depth in itertools.product(
        space.dropout_pattern, space.width, space.convs_per_block, space.linear_depth
    ):
        params = dataclasses.replace(
            BASELINE, dropout_pattern=pattern, width=width, convs_per_block=convs, linear_depth=depth
        )
        path = tmp_path / "model.pt"
        save_model(path, [build_model(params).state_dict()], params, CLASSES, {})
        sizes[pattern, width, convs, depth] = path.stat().st_size
        # What finalize --ensemble checks before training: the file's size, but for the pickle's structure.
        assert 0 <= sizes[pattern, width, convs, depth] - stored_bytes(params) < 64 * 2**10
    assert len(sizes) == 120
    assert max(sizes.values()) <= LIMIT, max(sizes.items(), key=lambda kv: kv[1])
    assert sizes["interlaced", 2.0, 2, 3] > 8 * 2**20  # the largest (5.9 M parameters) is stored, not lost


def test_weights_are_float16_and_statistics_float32(finalized: Path) -> None:
    [state] = torch.load(model_path(finalized), weights_only=True)["members"]
    weights = {k for k, v in state.items() if v.dim() >= 2}  # conv (4-D) and linear (2-D)
    assert {"block1.0.weight", "block4.0.weight"} <= weights and any(v.dim() == 2 for v in state.values())
    assert all(state[k].dtype == torch.float16 for k in weights)
    assert all(v.dtype == torch.float32 for k, v in state.items() if k not in weights and v.is_floating_point())
    assert state["block1.0.bias"].dtype == state["block1.1.running_var"].dtype == torch.float32


def test_compact_state_keeps_float32_where_float16_would_overflow() -> None:
    state = {
        "big.weight": torch.tensor([[1.0, 1e6]]),
        "small.weight": torch.tensor([[1.0, 1e-3]]),
        "inf.weight": torch.tensor([[1.0, float("inf")]]),
        "bias": torch.tensor([0.1]),
    }
    compact = compact_state(state)
    assert compact["big.weight"].dtype == torch.float32 and torch.equal(compact["big.weight"], state["big.weight"])
    assert compact["small.weight"].dtype == compact["inf.weight"].dtype == torch.float16
    assert compact["bias"].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(compact_state(compact).values(), compact.values()))  # idempotent


def test_a_float32_model_file_still_loads_and_predicts_as_its_weights(tmp_path: Path, tiny_fer: Path) -> None:
    """model.pt files written before weights were stored in float16 hold float32 ones."""
    torch.manual_seed(0)
    model = build_model(BASELINE).eval()
    doc = {
        "format": "fer-search-model/1",
        "state_dict": model.state_dict(),
        "params": BASELINE.to_dict(),
        "classes": list(CLASSES),
        "normalization": {"mean": 0.5, "std": 0.5},
        "meta": {},
    }
    torch.save(doc, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.members == 1 and not loaded.flip
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))
    images = sorted(tiny_fer.glob("test/*/*.jpg"))[:4]
    assert [p.label in CLASSES for p in predict_images(loaded, images)] == [True] * 4


def tiny_images(tiny_fer: Path) -> tuple[list[Path], torch.Tensor]:
    """A few test images and the uint8 batch predict makes of them."""
    paths = sorted(tiny_fer.glob("test/*/*.jpg"))[:10]
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("L")) for p in paths])).unsqueeze(1)
    return paths, x


def seeded_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return compact_state(build_model(BASELINE).state_dict())


def member(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_model(BASELINE)
    model.load_state_dict(state)
    return model.eval()


def test_a_flip_averaged_model_predicts_the_mean_logits_of_each_face_and_its_mirror(
    tmp_path: Path, tiny_fer: Path
) -> None:
    state = seeded_state(1)
    save_model(tmp_path / "model.pt", [state], BASELINE, CLASSES, {}, flip=True)
    loaded = load_model(tmp_path / "model.pt")
    paths, x = tiny_images(tiny_fer)
    model = member(state)
    expected = torch.softmax((logits_for(model, x) + logits_for(model, x.flip(-1))) / 2, dim=1)
    plain = torch.softmax(logits_for(model, x), dim=1)
    got = torch.tensor([[p.probs[c] for c in CLASSES] for p in predict_images(loaded, paths)])
    assert loaded.flip and loaded.members == 1
    assert torch.allclose(got, expected, atol=2e-6) and not torch.allclose(got, plain, atol=2e-5)


def test_an_ensemble_predicts_its_members_mean_probabilities(tmp_path: Path, tiny_fer: Path) -> None:
    states = [seeded_state(seed) for seed in (1, 2, 3)]
    save_model(tmp_path / "model.pt", states, BASELINE, CLASSES, {"seeds": [1, 2, 3]})
    loaded = load_model(tmp_path / "model.pt")
    paths, x = tiny_images(tiny_fer)
    expected = torch.stack([torch.softmax(logits_for(member(s), x), dim=1) for s in states]).mean(0)
    got = torch.tensor([[p.probs[c] for c in CLASSES] for p in predict_images(loaded, paths)])
    assert loaded.members == 3 and not loaded.flip
    assert torch.allclose(got, expected, atol=2e-6)


def test_mirrored_flips_left_to_right_only() -> None:
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    assert torch.equal(mirrored(x)[..., 0], x[..., -1]) and torch.equal(mirrored(mirrored(x)), x)


def test_a_file_listing_one_state_more_than_32_times_is_refused_before_building(
    tmp_path: Path, tiny_fer: Path, baseline_state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save stores a tensor once however often it is listed: such a file is small, its models are not."""
    monkeypatch.setattr("fer_search.predict.build_model", refuse_to_build)
    path = crafted_model(tmp_path / "model.pt", baseline_state, {"members": [baseline_state] * (MAX_MEMBERS + 1)})
    assert path.stat().st_size < 8 * 2**20
    assert "members must be a list of 1 to 32 state_dicts, not a list of length 33" in predict_error(path, tiny_fer)
