"""Property-based fuzzing of AdmissionReviews: the pure decisions never raise and always give a
well-formed answer, whatever the types inside the request; the server's parsing answers every body
with an AdmissionReview or a one-line 400, never a 500. Bounded to a few seconds in all."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelcache import certs
from modelcache.kube.constants import (
    LOCALMODEL_LABEL,
    LOCALMODEL_PVC_ANNOTATION,
    LOCALMODEL_SOURCEURI_ANNOTATION,
    MODEL_ANNOTATION,
    MOUNT_PATH_ANNOTATION,
    NODEGROUP_ANNOTATION,
)
from modelcache.webhook import admission, registration
from modelcache.webhook.admission import Cluster, EventNote, NotReadyPolicy, Obj, Options, Reads
from modelcache.webhook.limits import Limits
from modelcache.webhook.server import Webhook, serve
from tests.unit.test_admission import ENABLED, READY, URI, cache, group, node

KINDS = [
    "LocalModelCache",
    "LocalModelNamespaceCache",
    "LocalModelNodeGroup",
    "InferenceService",
    "LLMInferenceService",
    "Pod",
    "Secret",
]
OPERATIONS = ["CREATE", "UPDATE", "DELETE", "CONNECT"]
#: Keys real objects use, so the fuzzer walks the decision code instead of bouncing off it.
KEYS = [
    "metadata", "spec", "status", "name", "namespace", "labels", "annotations", "generateName",
    "deletionTimestamp", "ownerReferences", "controller", "uid", "kind", "apiVersion", "phase",
    "sourceModelUri", "modelSize", "nodeGroups", "storageLimit", "persistentVolumeSpec",
    "persistentVolumeClaimSpec", "local", "hostPath", "path", "capacity", "storage", "resources",
    "requests", "nodeAffinity", "required", "nodeSelectorTerms", "matchExpressions", "matchFields",
    "key", "operator", "values", "predictor", "model", "uri", "storageUri", "huggingface",
    "containers", "initContainers", "env", "value", "args", "volumes", "volumeMounts", "mountPath",
    "affinity", "requiredDuringSchedulingIgnoredDuringExecution", "persistentVolumeClaim",
    "claimName", "readOnly", "subPath",
]  # fmt: skip
STRINGS = [
    URI, "hf://org/other", "https://user:secret@host/m.bin?sig=abc", "workers", "gpus", "llama",
    "kserve-container", "storage-initializer", "worker-container", "STORAGE_URI", "/mnt/models",
    "In", "NotIn", "Exists", "Gt", "10Gi", "1.5T", "-1", "1e40", "", "relative/path", "pool",
    LOCALMODEL_LABEL, LOCALMODEL_SOURCEURI_ANNOTATION, LOCALMODEL_PVC_ANNOTATION, MODEL_ANNOTATION,
    MOUNT_PATH_ANNOTATION, NODEGROUP_ANNOTATION, "llama-workers", "2026-01-01T00:00:00Z",
]  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.sampled_from(STRINGS)
    | st.text(max_size=12)
)
keys = st.sampled_from(KEYS + STRINGS) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=30,
)
objects = st.dictionaries(keys, values, max_size=6)


@st.composite
def requests(draw: st.DrawFn) -> Obj:
    """Mostly the right envelope with anything inside; sometimes the envelope is wrong too."""
    request: Obj = {
        "uid": draw(st.text(min_size=1, max_size=8)),
        "kind": {"group": "serving.kserve.io", "version": "v1", "kind": draw(st.sampled_from(KINDS))},
        "operation": draw(st.sampled_from(OPERATIONS)),
        "namespace": draw(st.sampled_from(["", "default", "team"])),
        "object": draw(st.none() | objects),
        "oldObject": draw(st.none() | objects),
        "dryRun": draw(st.booleans()),
    }
    for key in draw(st.lists(st.sampled_from(sorted(request)), max_size=2)):
        request[key] = draw(values)  # a wrong type in the envelope itself
    return request


def state() -> Cluster:
    """A realistic cluster (the apiserver's side is typed) plus one cache of junk."""
    junk: Obj = {"metadata": {"name": "junk"}, "spec": {"nodeGroups": "workers", "sourceModelUri": 5}}
    return Cluster(
        caches=[cache("llama"), cache("other", uri="hf://org/other"), junk],
        namespace_caches=[cache("mine", namespace="team")],
        node_groups={"workers": group(), "gpus": group("gpus")},
        nodes=[node("n1", {"pool": "workers", **READY})],
        local_model_config=ENABLED,
    )


def assert_well_formed(uid: str, decision: admission.Decision) -> None:
    review = json.loads(json.dumps(admission.admission_response(uid, decision)))
    response = review["response"]
    assert review["kind"] == "AdmissionReview" and response["uid"] == uid
    assert isinstance(response["allowed"], bool)
    if not response["allowed"]:
        assert isinstance(response["status"]["message"], str) and response["status"]["message"]
        assert "secret" not in response["status"]["message"]
    if "patch" in response:
        for op in json.loads(base64.b64decode(response["patch"])):
            assert op["op"] in ("add", "remove", "replace") and op["path"].startswith("/")
    for warning in response.get("warnings", []):
        assert isinstance(warning, str) and "secret" not in warning


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests(), require=st.booleans())
def test_decisions_never_raise_and_are_well_formed(request: Obj, require: bool) -> None:
    cluster = state()
    admission.reads(request)
    policy = NotReadyPolicy.REQUIRE if require else NotReadyPolicy.WARN
    decision = admission.review(request, cluster, Options(when_not_ready=policy))
    uid = request["uid"] if isinstance(request.get("uid"), str) else ""
    assert_well_formed(uid, decision)


def envelope(request: Any) -> bytes:
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    ).encode()


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=64) | values.map(lambda v: json.dumps(v).encode()) | requests().map(envelope))
def test_parse_review_accepts_or_gives_one_line(body: bytes) -> None:
    try:
        request = admission.parse_review(body)
    except admission.MalformedReview as exc:
        assert exc.reason and "\n" not in exc.reason
        return
    assert isinstance(request["uid"], str) and request["uid"]
    assert_well_formed(request["uid"], admission.review(request, state(), Options()))


# -- through the real server ----------------------------------------------------------------------
class FixedCluster:
    async def read(self, request: Obj, needs: Reads) -> Cluster:
        return state()

    async def record(self, note: EventNote) -> None:
        return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, ssl.SSLContext]]:
    """The TLS server in a thread of its own (its own event loop) for the whole module."""
    tmp: Path = tmp_path_factory.mktemp("fuzz-pki")
    ca = certs.make_ca("fuzz-ca")
    leaf = certs.issue(ca, "127.0.0.1", hosts=["127.0.0.1"], server=True)
    leaf.write(tmp / "tls.crt", tmp / "tls.key")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp / "tls.crt", tmp / "tls.key")
    client_ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    ready: list[int] = []
    started = threading.Event()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        async with serve(
            Webhook(FixedCluster(), Options()), server_ctx, "127.0.0.1", 0, Limits()
        ) as listener:
            ready.append(listener.port)
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(60)
    yield ready[0], client_ctx
    loop.call_soon_threadsafe(stop.set)
    thread.join(60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=64) | requests().map(envelope), path=st.sampled_from(registration.PATHS))
def test_server_answers_every_body_with_a_review_or_a_400(
    server: tuple[int, ssl.SSLContext], body: bytes, path: str
) -> None:
    port, context = server
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=60)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer: Any = json.loads(resp.read())
    finally:
        conn.close()
    if resp.status == 400:
        assert isinstance(answer["error"], str) and "\n" not in answer["error"]
        return
    assert resp.status == 200, answer
    uid = json.loads(body)["request"]["uid"]
    assert answer["response"]["uid"] == uid and isinstance(answer["response"]["allowed"], bool)
