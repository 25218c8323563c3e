"""Reward models in the MLflow model registry, as pyfunc models that score like ``RewardModel``.

The transformers flavor would wrap the model in a text-classification pipeline, which knows
nothing of the chat formatting or the left truncation, so its scores would differ from training
and serving. The pyfunc below loads the same ``RewardModel`` (the HF folder is an artifact of the
model) and ships this package's code with it, so ``mlflow.pyfunc.load_model("models:/NAME/V")``
scores exactly as ``synpref score`` and ``synpref serve`` do.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient

ARTIFACT = "reward_model"
REQUIREMENTS = ["torch", "transformers", "numpy", "pandas", "pyarrow", "ray", "deltalake"]


class RewardModelPyfunc(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with a ``messages`` column (each a list of {role, content}, ending
    with the assistant response). Output: the raw reward of each conversation."""

    def load_context(self, context: Any) -> None:
        from pipelines.rm.model import RewardModel

        self.model = RewardModel(context.artifacts[ARTIFACT], max_length=None)

    def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:
        if "messages" not in model_input:
            raise ValueError("reward model input needs a 'messages' column of conversations")
        return self.model.score([list(m) for m in model_input["messages"]]).rewards


def log_reward_model(
    folder: str, register_as: str | None, tags: dict[str, str]
) -> tuple[ModelInfo, str | None]:
    """Log the HF folder as a pyfunc model of the active run and register it (tagged with
    ``tags``); returns the model info and the registered version."""
    info = mlflow.pyfunc.log_model(
        name=ARTIFACT,
        python_model=RewardModelPyfunc(),
        artifacts={ARTIFACT: folder},
        # The whole library, shipped with the model: loading it imports pipelines.rm.registry.
        code_paths=[str(Path(__file__).resolve().parents[1])],
        pip_requirements=REQUIREMENTS,
    )
    if register_as is None:
        return info, None
    version = mlflow.register_model(info.model_uri, register_as, tags=tags)
    return info, version.version


MODEL_VERSION_TAG = "synpref.model_version"
"""Tag of a registered version: the weights' fingerprint (``reward_model.model_version``), so a
job given the checkpoint folder finds the registered version it came from."""


def registered_as(fingerprint: str) -> str | None:
    """``models:/NAME/VERSION`` of the registered version holding these weights, if any."""
    with suppress(mlflow.exceptions.MlflowException):
        versions = MlflowClient().search_model_versions(
            f"tags.`{MODEL_VERSION_TAG}` = '{fingerprint}'"
        )
        if versions:
            latest = max(versions, key=lambda v: int(v.version))
            return f"models:/{latest.name}/{latest.version}"
    return None


def registered_version(name: str, tags: dict[str, str]) -> str | None:
    """The version of registered model ``name`` carrying all ``tags`` (a re-run's model)."""
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    for version in versions:
        if all(version.tags.get(k) == v for k, v in tags.items()):
            return version.version
    return None
