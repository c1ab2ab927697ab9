"""KServe's `inferenceservice-config` ConfigMap, key `localModel`: same keys and defaults as KServe,
including the spelling `reconcilationFrequencyInSecs` and `enabled: false`."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from modelcache.errors import UsageError


class LocalModelConfig(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    enabled: bool = False
    jobNamespace: str = "kserve-localmodel-jobs"
    defaultJobImage: str = "kserve/storage-initializer:latest"
    fsGroup: int | None = 1000
    jobTTLSecondsAfterFinished: int | None = 3600
    reconcilationFrequencyInSecs: int | None = 60
    disableVolumeManagement: bool = False

    @property
    def resync_seconds(self) -> int:
        return self.reconcilationFrequencyInSecs or 60


def parse_local_model_config(configmap_data: dict[str, Any] | None) -> LocalModelConfig:
    """From the ConfigMap's `data`; a missing key gives KServe's defaults, a malformed one an error."""
    raw = (configmap_data or {}).get("localModel")
    if not raw:
        return LocalModelConfig()
    try:
        return LocalModelConfig.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        first = str(exc).splitlines()[0]
        raise UsageError(f"inferenceservice-config localModel is not valid: {first}") from exc
