"""fer-search: hyperparameter search for facial-expression recognition on FER2013."""

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import fer_search` (and the CLI's start) does not import torch.
    if name == "load_model":
        from fer_search.predict import load_model

        return load_model
    raise AttributeError(name)
