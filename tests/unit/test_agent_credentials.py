"""Credentials the ways KServe finds them, against an in-memory Lookup (no apiserver)."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from modelcache.agent import credentials as cred
from modelcache.api.types import LocalModelInfo
from modelcache.errors import AuthError


class FakeLookup:
    def __init__(
        self,
        secrets: dict[str, dict[str, str]] | None = None,
        sas: dict[str, dict[str, Any]] | None = None,
        cscs: list[dict[str, Any]] | None = None,
        annotations: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.secrets, self.sas, self.cscs = secrets or {}, sas or {}, cscs or []
        self.annotations = annotations or {}

    async def secret(self, name: str) -> dict[str, str] | None:
        return self.secrets.get(name)

    async def secret_annotations(self, name: str) -> dict[str, str]:
        return self.annotations.get(name, {})

    async def service_account(self, name: str) -> dict[str, Any] | None:
        return self.sas.get(name)

    async def storage_containers(self) -> list[dict[str, Any]]:
        return self.cscs


def info(uri: str, **extra: Any) -> LocalModelInfo:
    return LocalModelInfo.model_validate({"modelName": "m", "sourceModelUri": uri, **extra})


def resolve(
    i: LocalModelInfo,
    lookup: FakeLookup,
    tmp: Path,
    config: cred.CredentialConfig | None = None,
    base: dict[str, str] | None = None,
) -> cred.Credentials:
    return asyncio.run(cred.resolve(i, lookup, config or cred.CredentialConfig(), tmp, base=base))


def csc(name: str, formats: list[dict[str, str]], env: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "container": {"name": "storage-initializer", "image": "x", "env": env},
            "supportedUriFormats": formats,
            "workloadType": extra.pop("workloadType", "localModelDownloadJob"),
        },
        **extra,
    }


def test_cluster_storage_container_env_with_secret_ref(tmp_path: Path) -> None:
    lookup = FakeLookup(
        secrets={"hf-secret": {"HF_TOKEN": "hf_abc123"}},
        cscs=[
            csc(
                "init-only",
                [{"prefix": "hf://"}],
                [{"name": "X", "value": "no"}],
                workloadType="initContainer",
            ),
            csc("disabled", [{"prefix": "hf://"}], [{"name": "X", "value": "no"}], disabled=True),
            csc("b-regex", [{"regex": r"^hf://org/.*"}], [{"name": "X", "value": "regex"}]),
            csc(
                "a-hf",
                [{"prefix": "hf://"}],
                [
                    {
                        "name": "HF_TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": "hf-secret", "key": "HF_TOKEN"}},
                    },
                    {"name": "HF_HUB_OFFLINE", "value": "0"},
                    {
                        "name": "OPT",
                        "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
                    },
                ],
            ),
        ],
    )
    c = resolve(info("hf://org/model"), lookup, tmp_path, base={"HOME": "/root", "HF_TOKEN": "from-env"})
    assert c.env["HF_TOKEN"] == "hf_abc123" and c.env["HF_HUB_OFFLINE"] == "0" and c.env["HOME"] == "/root"
    assert "X" not in c.env and "OPT" not in c.env
    assert c.secrets == {"hf_abc123"}
    assert resolve(info("s3://b/k"), lookup, tmp_path, base={"A": "1"}).env == {"A": "1"}


def test_missing_required_secret_ref_names_it_but_no_value(tmp_path: Path) -> None:
    lookup = FakeLookup(
        cscs=[
            csc(
                "c",
                [{"prefix": "s3://"}],
                [{"name": "T", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k"}}}],
            )
        ]
    )
    with pytest.raises(AuthError, match="gone"):
        resolve(info("s3://b/k"), lookup, tmp_path)


def test_storage_key_s3_with_parameters(tmp_path: Path) -> None:
    data = {
        "type": "s3",
        "access_key_id": "AKIA1",
        "secret_access_key": "SECRET1",
        "endpoint_url": "http://minio:9000",
        "region": "eu-west-1",
        "bucket": "models",
    }
    lookup = FakeLookup(secrets={"storage-config": {"localMinIO": json.dumps(data)}})
    i = info("s3://models/llm", storage={"key": "localMinIO", "parameters": {"region": "us-east-2"}})
    c = resolve(i, lookup, tmp_path)
    assert c.env["AWS_ACCESS_KEY_ID"] == "AKIA1" and c.env["AWS_SECRET_ACCESS_KEY"] == "SECRET1"
    assert c.env["AWS_ENDPOINT_URL"] == "http://minio:9000" and c.env["S3_USE_HTTPS"] == "0"
    assert c.env["AWS_DEFAULT_REGION"] == "us-east-2"
    assert {"AKIA1", "SECRET1"} <= c.secrets

    custom = cred.CredentialConfig.model_validate({"storageSpecSecretName": "my-storage"})
    with pytest.raises(AuthError, match="my-storage"):
        resolve(i, lookup, tmp_path, custom)
    with pytest.raises(AuthError, match="not found in storage secret"):
        resolve(info("s3://m/x", storage={"key": "other"}), lookup, tmp_path)
    bad = FakeLookup(secrets={"storage-config": {"k": json.dumps({"type": "gcs"})}})
    with pytest.raises(AuthError, match="not supported"):
        resolve(info("gs://b/x", storage={"key": "k"}), bad, tmp_path)


def test_service_account_secrets_by_kind(tmp_path: Path) -> None:
    gcs_key = '{"type": "service_account", "private_key": "-----BEGIN"}'
    lookup = FakeLookup(
        sas={
            "sa": {
                "metadata": {"name": "sa", "annotations": {}},
                "secrets": [
                    {"name": "s3"},
                    {"name": "gcs"},
                    {"name": "hf"},
                    {"name": "https"},
                    {"name": "az"},
                ],
            }
        },
        secrets={
            "s3": {"awsAccessKeyID": "ID1", "awsSecretAccessKey": "KEY1"},
            "gcs": {"gcloud-application-credentials.json": gcs_key},
            "hf": {"HF_TOKEN": "hf_x1"},
            "https": {"https-host": "example.com", "headers": json.dumps({"Authorization": "Bearer tok9"})},
            "az": {"AZ_CLIENT_ID": "cid", "AZ_CLIENT_SECRET": "csecret", "AZ_TENANT_ID": "tid"},
        },
        annotations={
            "s3": {"serving.kserve.io/s3-endpoint": "minio.local:9000", "serving.kserve.io/s3-usehttps": "0"}
        },
    )
    c = resolve(info("https://example.com/m.tar", serviceAccountName="sa"), lookup, tmp_path)
    assert c.env["AWS_ACCESS_KEY_ID"] == "ID1" and c.env["AWS_SECRET_ACCESS_KEY"] == "KEY1"
    assert c.env["AWS_ENDPOINT_URL"] == "http://minio.local:9000" and c.env["S3_USE_HTTPS"] == "0"
    key_file = Path(c.env["GOOGLE_APPLICATION_CREDENTIALS"])
    assert key_file.read_text() == gcs_key and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert c.env["HF_TOKEN"] == "hf_x1"
    assert c.env["MODELCACHE_HTTP_BEARER_TOKEN"] == "tok9" and "example.com-headers" in c.env
    assert c.env["AZURE_CLIENT_ID"] == "cid" and c.env["AZ_CLIENT_SECRET"] == "csecret"
    assert {"ID1", "KEY1", "hf_x1", "tok9", gcs_key, "csecret"} <= c.secrets


def test_service_account_used_only_when_asked_and_irsa(tmp_path: Path) -> None:
    lookup = FakeLookup(
        sas={
            "default": {"metadata": {"name": "default"}, "secrets": [{"name": "hf"}]},
            "irsa": {
                "metadata": {
                    "name": "irsa",
                    "annotations": {
                        "eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x",
                        "serving.kserve.io/s3-region": "us-west-2",
                    },
                }
            },
        },
        secrets={"hf": {"HF_TOKEN": "hf_default"}},
    )
    assert "HF_TOKEN" not in resolve(info("hf://o/m"), lookup, tmp_path).env  # no SA, no storage: none
    assert resolve(info("hf://o/m", storage={}), lookup, tmp_path).env["HF_TOKEN"] == "hf_default"
    c = resolve(info("s3://b/k", serviceAccountName="irsa"), lookup, tmp_path)
    assert c.env["AWS_DEFAULT_REGION"] == "us-west-2"
    assert resolve(info("s3://b/k", serviceAccountName="missing"), lookup, tmp_path).env == {}


def test_storage_key_overrides_container_env(tmp_path: Path) -> None:
    lookup = FakeLookup(
        secrets={"storage-config": {"k": json.dumps({"type": "s3", "access_key_id": "new"})}},
        cscs=[csc("c", [{"prefix": "s3://"}], [{"name": "AWS_ACCESS_KEY_ID", "value": "old"}])],
    )
    assert resolve(info("s3://b/k", storage={"key": "k"}), lookup, tmp_path).env["AWS_ACCESS_KEY_ID"] == "new"


def test_credential_config_parsing() -> None:
    cfg = cred.parse_credential_config({"credentials": json.dumps({"s3": {"s3AccessKeyIDName": "id"}})})
    assert cfg.s3.s3AccessKeyIDName == "id"
    assert cred.parse_credential_config({"credentials": "{not json"}) == cred.CredentialConfig()
    assert cred.parse_credential_config(None) == cred.CredentialConfig()
