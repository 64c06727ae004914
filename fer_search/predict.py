"""model.pt: writing and safely loading a finalized model, and prediction on image files."""

from __future__ import annotations

import io
import pickle
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fer_search.augment import MEAN, STD
from fer_search.errors import UserError
from fer_search.files import write_file
from fer_search.model import TrialParams, build_model, check_params
from fer_search.sources import CLASSES, decode_image
from fer_search.train import logits_for

FORMAT = "fer-search-model/2"  # members and flip; /1 held one state_dict and no flip, and still loads
FORMAT_1 = "fer-search-model/1"
# A model file must fit where results travel (the GPU machine gives back files of at most 16 MiB), and
# stays small enough to mail; finalize --ensemble is refused before training where it would not.
MODEL_FILE_LIMIT = 16 * 2**20
# The most members a model file may hold: a crafted file can list one small set of tensors a million
# times (torch.save stores each storage once), which would build a million models.
MAX_MEMBERS = 32


class Classifier(nn.Module):
    """What a model file predicts with: each member's logits, averaged with the mirror image's where `flip`,
    then the members' probabilities averaged (combined_logits); one member without flip is that model as it is."""

    def __init__(self, members: list[nn.Module], flip: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.flip = flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = [m(x) for m in self.members]
        return combined_logits(plain, [m(mirrored(x)) for m in self.members] if self.flip else None)


def mirrored(x: torch.Tensor) -> torch.Tensor:
    """Images (N,C,H,W) flipped left to right, laid out as logits_for lays out its batches, so that a member's
    logits of the mirror images are the same numbers here and in finalize's evaluation."""
    return x.flip(-1).contiguous(memory_format=torch.channels_last)


def combined_logits(plain: list[torch.Tensor], mirror: list[torch.Tensor] | None) -> torch.Tensor:
    """One set of logits from the members' (and, for flip averaging, their mirror images'): the one formula
    of predict and of finalize's figures, so that what metrics.json claims is what predict does.

    Flip averages a face's logits with its mirror image's (test-time augmentation); an ensemble averages the
    members' probabilities, returned as their log, whose softmax gives those probabilities back."""
    logits = plain if mirror is None else [(p + m) / 2 for p, m in zip(plain, mirror)]
    if len(logits) == 1:
        return logits[0]
    return torch.log(torch.stack([torch.softmax(z, dim=1) for z in logits]).mean(0))


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # a Classifier: float32, CPU, eval mode
    params: TrialParams
    classes: tuple[str, ...]
    meta: dict[str, Any]
    members: int  # seeds ensembled (1: a single model)
    flip: bool


@dataclass(frozen=True)
class Prediction:
    path: Path
    label: str
    probs: dict[str, float]


def compact_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` as model.pt stores it: conv and linear weights in float16, everything else as it is.

    Why: float32 made the largest model of the space 22.6 MiB; float16 weights keep every one under
    16 MiB, and the accuracy it costs is measured, not assumed, since finalize evaluates this state.
    Biases and BatchNorm statistics are a few kilobytes and keep float32. A weight that float16
    cannot hold (overflow to inf) keeps float32. Idempotent; loading into the float32 model converts back.
    """
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dim() >= 2:  # conv (4-D) and linear (2-D) weights
            half = tensor.to(torch.float16)
            if torch.equal(torch.isfinite(half), torch.isfinite(tensor)):  # no finite value overflowed
                tensor = half
        out[name] = tensor
    return out


def stored_bytes(params: TrialParams) -> int:
    """About how many bytes one model of `params` takes in a model file: its weights as compact_state stores
    them (the pickle's own structure adds a few kilobytes)."""
    with torch.device("meta"):  # shapes and types only: nothing is allocated
        state = build_model(params).state_dict()
    return sum(t.numel() * (2 if t.is_floating_point() and t.dim() >= 2 else t.element_size()) for t in state.values())


def save_model(
    path: Path,
    states: list[dict[str, torch.Tensor]],
    params: TrialParams,
    classes: tuple[str, ...],
    meta: dict[str, Any],
    flip: bool = False,
) -> None:
    """Write model.pt atomically: only tensors and plain values, so weights_only loading works.

    `states` are the members (one: a single model; several: an ensemble averaging their probabilities);
    `flip` averages each face's logits with its mirror image's. The weights are stored compactly
    (compact_state); pass states already compacted to have the file hold exactly the weights you evaluated.
    """
    doc = {
        "format": FORMAT,
        "members": [compact_state(state) for state in states],
        "flip": flip,
        "params": params.to_dict(),
        "classes": list(classes),
        "normalization": {"mean": MEAN, "std": STD},
        "meta": meta,
    }
    buffer = io.BytesIO()
    torch.save(doc, buffer)
    write_file(path, buffer.getvalue())


def load_model(path: Path | str) -> LoadedModel:
    """A finalized model, without the study or the config; refuses files that would run code."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a model file (finalize writes <its --out>/model.pt)")
    if not path.is_file():
        raise UserError(f"model file not found: {path} (`fer-search finalize` writes one)")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # weights_only met an object that could run code
            raise UserError(
                f"{path}: holds objects other than tensors and plain values; refusing to load it "
                "(only model.pt files written by `fer-search finalize` are accepted)"
            ) from None
        raise UserError(f"{path}: not a readable model file (damaged or not written by torch.save)") from None
    # torch.load raises many types on files that are not its own (KeyError, RuntimeError, EOFError, ...).
    except Exception as e:
        raise UserError(f"{path}: not a readable model file ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") not in (FORMAT, FORMAT_1):
        raise UserError(f"{path}: not a fer-search model file (no format {FORMAT!r})")
    try:
        return _model_from_document(doc)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(
            f"{path}: a damaged fer-search model file ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None


def _model_from_document(doc: dict[str, Any]) -> LoadedModel:
    """The model a model.pt document describes; raises KeyError, TypeError, ValueError or RuntimeError if damaged."""
    # Every value is checked before the model is built: a crafted file is refused, not built (width 1e6
    # would ask for terabytes, 10**7 classes for gigabytes).
    if doc["normalization"] != {"mean": MEAN, "std": STD}:
        raise ValueError(f"normalization must be {{'mean': {MEAN}, 'std': {STD}}} (this version's)")
    classes = _classes_of(doc["classes"])
    params = _params_of(doc["params"])
    if doc["format"] == FORMAT_1:
        states, flip = [_state_of(doc["state_dict"])], False
    else:
        states, flip = _members_of(doc["members"]), doc["flip"]
        if not isinstance(flip, bool):
            raise TypeError(f"flip must be true or false, not {_kind(flip)}")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, not {_kind(meta)}")
    return LoadedModel(
        classifier_from_states(params, states, len(classes), flip), params, classes, meta, len(states), flip
    )


def _members_of(raw: Any) -> list[dict[str, torch.Tensor]]:
    """The file's member state_dicts: 1 to MAX_MEMBERS of them."""
    if not (isinstance(raw, list) and 1 <= len(raw) <= MAX_MEMBERS):
        raise ValueError(f"members must be a list of 1 to {MAX_MEMBERS} state_dicts, not {_kind(raw)}")
    return [_state_of(state) for state in raw]


def _classes_of(raw: Any) -> tuple[str, ...]:
    """FER2013's classes in label order, which the file must list exactly."""
    # Exactly: the data loader's labels are indices into CLASSES, so any other list (even the same names
    # reordered) would name every prediction wrongly; finalize writes no other.
    if not (isinstance(raw, list) and len(raw) == len(CLASSES) and all(isinstance(c, str) for c in raw)):
        raise ValueError(f"classes must be FER2013's {len(CLASSES)}, not {_kind(raw)}")
    if tuple(raw) != CLASSES:
        raise ValueError(f"classes must be FER2013's in label order ({', '.join(CLASSES)})")
    return CLASSES


def _params_of(raw: Any) -> TrialParams:
    """The file's TrialParams, within the model family (check_params)."""
    if not isinstance(raw, dict):
        raise TypeError(f"params must be a dict of TrialParams fields, not {_kind(raw)}")
    params = TrialParams.from_dict(raw)
    check_params(params)
    return params


def _state_of(raw: Any) -> dict[str, torch.Tensor]:
    """The file's state_dict, as load_state_dict can take it (its shapes are compared there)."""
    if not isinstance(raw, dict):
        raise TypeError(f"state_dict must be a dict of tensors, not {_kind(raw)}")
    for key, value in raw.items():
        if not (isinstance(key, str) and isinstance(value, torch.Tensor)):
            raise TypeError(f"state_dict[{reprlib.repr(key)}] must be a tensor named by a string, not {_kind(value)}")
    return raw


def _kind(value: Any) -> str:
    """What a value is, in a few words whatever its size: its type, and its length where it has one."""
    if isinstance(value, (list, dict, str)):
        return f"a {type(value).__name__} of length {len(value)}"
    return type(value).__name__


def model_from_state(params: TrialParams, state: dict[str, torch.Tensor], num_classes: int) -> nn.Module:
    """The float32 CPU model in eval mode holding `state` (float16 or float32 weights alike): the one way
    predict and finalize's test metrics build the model they evaluate."""
    model = build_model(params, num_classes=num_classes)
    model.load_state_dict(state)  # copies into the float32 parameters, converting float16
    return model.eval()


def classifier_from_states(
    params: TrialParams, states: list[dict[str, torch.Tensor]], num_classes: int, flip: bool
) -> Classifier:
    """The Classifier of `states`, as load_model builds it from a model file."""
    return Classifier([model_from_state(params, state, num_classes) for state in states], flip).eval()


def probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Softmax over classes, float32 on the CPU: how both predict and finalize's test metrics compute."""
    return torch.softmax(logits_for(model, x.cpu()), dim=1)


def predict_images(loaded: LoadedModel, paths: list[Path]) -> list[Prediction]:
    """Each image is converted exactly as the data loader converts training images."""
    arrays = []
    for p in paths:
        try:
            raw = Path(p).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read image {p}: {e.strerror}") from None
        arrays.append(torch.from_numpy(decode_image(raw, str(p))[0]))
    x = torch.stack(arrays).unsqueeze(1)
    probs = probabilities(loaded.model, x)
    return [
        Prediction(
            Path(p), loaded.classes[int(row.argmax())], {c: round(float(v), 6) for c, v in zip(loaded.classes, row)}
        )
        for p, row in zip(paths, probs)
    ]
