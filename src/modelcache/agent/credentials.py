"""Source credentials for one model, found the ways KServe finds them, as an env mapping.

KServe's download Job gets credentials from (later wins, as in a container's env list):
1. the ClusterStorageContainer (workloadType `localModelDownloadJob`, not disabled) whose
   `supportedUriFormats` match the URI first: its container `env`, `secretKeyRef`s included;
2. when the entry names a `storage.key`: that key of the storage-config secret (JSON; for
   `type: s3` its fields become AWS_* variables, as KServe's storage initializer does), with
   `storage.parameters` overriding fields;
   otherwise, when it names a `serviceAccountName` (or any `storage`): the service account's
   secrets, read by kind as KServe's credential builder reads them (S3 keys, GCS key file,
   Azure, HTTPS headers, HF token), and the S3 settings of an IRSA-annotated account.
Everything is looked up in the `jobNamespace`. The agent's own environment sits underneath as a
fallback. Values never leave this mapping: the `secrets` set lets callers scrub messages.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from modelcache import domain
from modelcache.api.types import LocalModelInfo
from modelcache.errors import AuthError

DEFAULT_STORAGE_SECRET = "storage-config"
DEFAULT_SERVICE_ACCOUNT = "default"
LOCAL_MODEL_WORKLOAD = domain.LOCAL_MODEL_WORKLOAD
SUPPORTED_STORAGE_TYPES = ("s3", "hdfs", "webhdfs")
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"
S3_ANNOTATION_PREFIX = "serving.kserve.io/"
GCS_DEFAULT_FILE = "gcloud-application-credentials.json"
HF_TOKEN = "HF_TOKEN"
HTTPS_HOST = "https-host"
HTTP_BEARER_ENV = "MODELCACHE_HTTP_BEARER_TOKEN"

#: storage-config JSON field -> variable, for `type: s3` (KServe's storage initializer mapping).
S3_STORAGE_FIELDS = (
    ("AWS_ENDPOINT_URL", "endpoint_url"),
    ("AWS_ACCESS_KEY_ID", "access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
    ("AWS_DEFAULT_REGION", "region"),
    ("AWS_CA_BUNDLE", "ca_bundle"),
    ("S3_VERIFY_SSL", "verify_ssl"),
    ("awsAnonymousCredential", "anonymous"),
)
AZURE_KEYS = (
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_ACCESS_TOKEN",
    "AZURE_ACCESS_EXPIRES_ON_SECONDS",
    "AZURE_ACCOUNT_NAME",
    "AZURE_SERVICE_URL",
)
AZURE_LEGACY = {
    "AZURE_SUBSCRIPTION_ID": "AZ_SUBSCRIPTION_ID",
    "AZURE_TENANT_ID": "AZ_TENANT_ID",
    "AZURE_CLIENT_ID": "AZ_CLIENT_ID",
    "AZURE_CLIENT_SECRET": "AZ_CLIENT_SECRET",
}


class S3Config(BaseModel):
    model_config = ConfigDict(extra="allow")

    s3AccessKeyIDName: str = ""
    s3SecretAccessKeyName: str = ""
    s3Endpoint: str = ""
    s3UseHttps: str = ""
    s3Region: str = ""
    s3VerifySSL: str = ""
    s3UseVirtualBucket: str = ""
    s3UseAccelerate: str = ""
    s3UseAnonymousCredential: str = ""
    s3CABundle: str = ""


class GCSConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    gcsCredentialFileName: str = ""


class CredentialConfig(BaseModel):
    """The `credentials` key of inferenceservice-config (KServe's CredentialConfig)."""

    model_config = ConfigDict(extra="allow")

    s3: S3Config = S3Config()
    gcs: GCSConfig = GCSConfig()
    storageSpecSecretName: str = ""
    storageSecretNameAnnotation: str = ""


def parse_credential_config(configmap_data: Mapping[str, Any] | None) -> CredentialConfig:
    raw = (configmap_data or {}).get("credentials")
    if not raw:
        return CredentialConfig()
    try:
        return CredentialConfig.model_validate(json.loads(raw))
    except ValueError:
        return CredentialConfig()  # KServe panics; a broken key must not stop every download


class Lookup(Protocol):
    """Reads in the job namespace. Secret data comes decoded (str values); None when absent."""

    async def secret(self, name: str) -> dict[str, str] | None: ...

    async def service_account(self, name: str) -> dict[str, Any] | None: ...

    async def storage_containers(self) -> list[dict[str, Any]]: ...


@dataclass
class Credentials:
    env: dict[str, str] = field(default_factory=dict)
    secrets: set[str] = field(default_factory=set)  # values to scrub from any message
    origin: list[str] = field(default_factory=list)  # where they came from (names only), for logs

    def set(self, name: str, value: str, *, secret: bool) -> None:
        self.env[name] = value
        if secret:
            self.secrets.add(value)


# -- ClusterStorageContainer -------------------------------------------------------------------
# One rule with the controller (download Jobs) and the webhook: modelcache.domain.
uri_supported = domain.uri_supported
matching_container = domain.matching_container


async def _container_env(csc: Mapping[str, Any], lookup: Lookup, creds: Credentials) -> None:
    name = (csc.get("metadata") or {}).get("name", "?")
    creds.origin.append(f"clusterstoragecontainer/{name}")
    for var in ((csc.get("spec") or {}).get("container") or {}).get("env") or []:
        vname = var.get("name")
        if not vname:
            continue
        if "value" in var and var["value"] is not None:
            creds.set(vname, str(var["value"]), secret=False)
            continue
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if not ref:
            continue  # configMapKeyRef/fieldRef: not meaningful outside a pod
        data = await lookup.secret(ref.get("name", ""))
        value = None if data is None else data.get(ref.get("key", ""))
        if value is None:
            if ref.get("optional"):
                continue
            raise AuthError(
                f"ClusterStorageContainer {name}: env {vname} needs key {ref.get('key')!r} of secret "
                f"{ref.get('name')!r}, which does not exist in the job namespace"
            )
        creds.set(vname, value, secret=True)


# -- storage-config secret ---------------------------------------------------------------------
async def _storage_spec_env(
    info: LocalModelInfo, config: CredentialConfig, lookup: Lookup, creds: Credentials
) -> None:
    assert info.storage is not None and info.storage.key
    key = info.storage.key
    secret_name = config.storageSpecSecretName or DEFAULT_STORAGE_SECRET
    data = await lookup.secret(secret_name)
    if data is None:
        raise AuthError(f"storage key {key!r} given but secret {secret_name!r} does not exist")
    raw = data.get(key)
    if raw is None:
        raise AuthError(f"storage key {key!r} not found in storage secret {secret_name!r}")
    try:
        spec = json.loads(raw)
        if not isinstance(spec, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise AuthError(f"invalid JSON in key {key!r} of storage secret {secret_name!r}") from exc
    params = dict(info.storage.parameters or {})
    stype = params.get("type") or spec.get("type", "")
    if stype and stype not in SUPPORTED_STORAGE_TYPES:
        raise AuthError(
            f"storage type must be one of [{', '.join(SUPPORTED_STORAGE_TYPES)}]. "
            f"storage type [{stype}] is not supported"
        )
    merged = {**{k: str(v) for k, v in spec.items()}, **params}
    creds.origin.append(f"secret/{secret_name}[{key}]")
    if merged.get("type") == "s3":
        for env_name, fld in S3_STORAGE_FIELDS:
            if fld in merged:
                creds.set(env_name, merged[fld], secret=fld in ("access_key_id", "secret_access_key"))
        endpoint = merged.get("endpoint_url", "")
        if endpoint.lower().startswith("http://"):
            creds.set("S3_USE_HTTPS", "0", secret=False)


# -- service account secrets -------------------------------------------------------------------
def _pick(
    annotations: Mapping[str, str], data: Mapping[str, str] | None, annotation: str, key: str, default: str
) -> str:
    if S3_ANNOTATION_PREFIX + annotation in annotations:
        return annotations[S3_ANNOTATION_PREFIX + annotation]
    if data is not None and key in data:
        return data[key]
    return default


def s3_settings(
    annotations: Mapping[str, str], data: Mapping[str, str] | None, s3: S3Config
) -> dict[str, str]:
    """KServe's BuildS3EnvVars: endpoint/https/region/... from annotations, secret data, config."""
    env: dict[str, str] = {}
    endpoint = _pick(annotations, data, "s3-endpoint", "S3_ENDPOINT", s3.s3Endpoint).strip()
    if endpoint:
        low = endpoint.lower()
        if low.startswith("https://"):
            https, host, url = "1", endpoint[8:], endpoint
        elif low.startswith("http://"):
            https, host, url = "0", endpoint[7:], endpoint
        else:
            https = _pick(annotations, data, "s3-usehttps", "S3_USE_HTTPS", s3.s3UseHttps)
            host = endpoint
            url = ("http://" if https == "0" else "https://") + endpoint
        if https:
            env["S3_USE_HTTPS"] = https
        env["S3_ENDPOINT"] = host
        env["AWS_ENDPOINT_URL"] = url
    for annotation, name, default in (
        ("s3-verifyssl", "S3_VERIFY_SSL", s3.s3VerifySSL),
        ("s3-useanoncredential", "awsAnonymousCredential", s3.s3UseAnonymousCredential),
        ("s3-region", "AWS_DEFAULT_REGION", s3.s3Region),
        ("s3-usevirtualbucket", "S3_USER_VIRTUAL_BUCKET", s3.s3UseVirtualBucket),
        ("s3-useaccelerate", "S3_USE_ACCELERATE", s3.s3UseAccelerate),
        ("s3-cabundle", "AWS_CA_BUNDLE", s3.s3CABundle),
    ):
        value = _pick(annotations, data, annotation, name, default)
        if value:
            env[name] = value
    return env


def _write_private(files_dir: Path, content: str) -> Path:
    """A key file for a source that wants a path (GCS): 0600 in the agent's private directory."""
    files_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = files_dir / f"{hashlib.sha256(content.encode()).hexdigest()[:16]}.json"
    if not path.exists():
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.replace(path.with_suffix(".tmp"), path)
    return path


def _https_env(uri: str, data: Mapping[str, str], creds: Credentials) -> None:
    host, headers = data.get(HTTPS_HOST), data.get("headers")
    if not host or headers is None:
        return
    creds.set(f"{host}-headers", headers, secret=True)
    # Our http source speaks bearer tokens: lift one out of the headers for this host.
    if (urlsplit(uri).hostname or "") != host.split(":")[0]:
        return
    try:
        parsed = json.loads(headers)
    except ValueError:
        return
    if isinstance(parsed, dict):
        for name, value in parsed.items():
            if str(name).lower() == "authorization" and str(value).lower().startswith("bearer "):
                creds.set(HTTP_BEARER_ENV, str(value)[7:].strip(), secret=True)


def secret_env(
    uri: str,
    name: str,
    data: Mapping[str, str],
    annotations: Mapping[str, str],
    config: CredentialConfig,
    creds: Credentials,
    files_dir: Path,
) -> None:
    """One service-account secret, by kind, first match wins (KServe's mountSecretCredential)."""
    s3_secret = config.s3.s3SecretAccessKeyName or "awsSecretAccessKey"
    s3_id = config.s3.s3AccessKeyIDName or "awsAccessKeyID"
    gcs_file = config.gcs.gcsCredentialFileName or GCS_DEFAULT_FILE
    if s3_secret in data:
        creds.origin.append(f"secret/{name} (s3)")
        if s3_id in data:
            creds.set("AWS_ACCESS_KEY_ID", data[s3_id], secret=True)
        creds.set("AWS_SECRET_ACCESS_KEY", data[s3_secret], secret=True)
        for k, v in s3_settings(annotations, data, config.s3).items():
            creds.set(k, v, secret=False)
    elif gcs_file in data:
        creds.origin.append(f"secret/{name} (gcs)")
        creds.secrets.add(data[gcs_file])
        creds.set(
            "GOOGLE_APPLICATION_CREDENTIALS", str(_write_private(files_dir, data[gcs_file])), secret=False
        )
    elif any(
        k in data
        for k in ("AZ_CLIENT_ID", "AZURE_CLIENT_ID", "AZURE_ACCESS_TOKEN", "AZURE_STORAGE_ACCESS_KEY")
    ):
        creds.origin.append(f"secret/{name} (azure)")
        for k in AZURE_KEYS:
            legacy = AZURE_LEGACY.get(k)
            value = data.get(legacy) if legacy and legacy in data else data.get(k)
            if value:
                creds.set(k, value, secret=True)
                if legacy:
                    creds.set(legacy, value, secret=True)
    elif HTTPS_HOST in data:
        creds.origin.append(f"secret/{name} (https)")
        _https_env(uri, data, creds)
    elif HF_TOKEN in data:
        creds.origin.append(f"secret/{name} (hf)")
        creds.set(HF_TOKEN, data[HF_TOKEN], secret=True)


async def _service_account_env(
    info: LocalModelInfo, config: CredentialConfig, lookup: Lookup, creds: Credentials, files_dir: Path
) -> None:
    sa_name = info.serviceAccountName or DEFAULT_SERVICE_ACCOUNT
    sa = await lookup.service_account(sa_name)
    if sa is None:
        return  # KServe logs and carries on without credentials
    annotations = (sa.get("metadata") or {}).get("annotations") or {}
    if IRSA_ANNOTATION in annotations:
        creds.origin.append(f"serviceaccount/{sa_name} (irsa)")
        for k, v in s3_settings(annotations, None, config.s3).items():
            creds.set(k, v, secret=False)
    for ref in sa.get("secrets") or []:
        name = ref.get("name")
        if not name:
            continue
        data = await lookup.secret(name)
        if data is None:
            raise AuthError(f"service account {sa_name!r} refers to secret {name!r}, which does not exist")
        secret_annotations = await _annotations_of(lookup, name)
        secret_env(info.sourceModelUri, name, data, secret_annotations, config, creds, files_dir)


async def _annotations_of(lookup: Lookup, name: str) -> dict[str, str]:
    getter = getattr(lookup, "secret_annotations", None)
    if getter is None:
        return {}
    result: dict[str, str] = await getter(name)
    return result


async def resolve(
    info: LocalModelInfo,
    lookup: Lookup,
    config: CredentialConfig,
    files_dir: Path,
    base: Mapping[str, str] | None = None,
) -> Credentials:
    """The env mapping to hand the engine for this entry (`base`, usually os.environ, underneath)."""
    creds = Credentials(env=dict(base or {}))
    csc = matching_container(await lookup.storage_containers(), info.sourceModelUri)
    if csc is not None:
        await _container_env(csc, lookup, creds)
    if info.storage is not None and info.storage.key:
        await _storage_spec_env(info, config, lookup, creds)
    elif info.serviceAccountName or info.storage is not None:
        await _service_account_env(info, config, lookup, creds, files_dir)
    return creds
