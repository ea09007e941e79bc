"""A Kubernetes API on loopback for the tests: kmock's emulator served over real HTTP, and ``JobRunner``, which
plays the controllers kmock does not run.

- ``KubeServer``: kmock on 127.0.0.1 in its own event-loop thread, with a kubeconfig file pointing at it (plus a
  context ``nowhere`` that points at a closed port).
- ``ApplyingEmulator``: kmock's emulator, plus creation of an absent object by a server-side apply.
- ``ServerEmulator``: also sets what an API server sets on objects (``uid``, ``creationTimestamp``,
  ``resourceVersion``, ``generation``) and answers a failed JSON-patch ``test`` with 422, as kopf expects.
- ``JobRunner``: job controller + kubelet + Kueue. It picks up each Job, runs its pods as the real
  ``alignfake stage`` command (args from the Job, the spec from the ConfigMap, ``JOB_COMPLETION_INDEX`` per
  index), and writes the Job's status (``Complete``, or ``Failed`` by the Job's own ``podFailurePolicy``).

Used by tests/test_k8s_submit.py (the CLI's submit/status/logs/cancel) and tests/test_operator.py (the operator).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import kmock
import yaml
from kmock._internal import dicts as kmock_dicts  # the emulator's own merge/JSON patching
from kmock._internal import enums as kmock_enums  # action names of kmock requests

from alignfake.errors import AlignfakeError
from alignfake.executors import kubernetes as kx
from alignfake.k8s import render
from alignfake.spec import parse_experiment

NAMESPACE = "lab"


# ---------------------------------------------------------------------------------------------- the API server


class ApplyingEmulator(kmock.KubernetesEmulator):
    """kmock's emulator creates objects on POST only. A real API server also creates an absent object on a
    server-side apply (PATCH with ``application/apply-patch+yaml``); this adds that, and nothing else."""

    async def _handle(self, request: Any) -> Any:
        if _is_creating_apply(self, request):
            key = (request.resource, request.namespace, request.name)
            async with self._lock:
                if key not in self.objects:
                    self.objects[key] = request.data
                elif self.objects[key].deleted:
                    self.objects[key].create(request.data)
        return await super()._handle(request)


def _is_creating_apply(emulator: kmock.KubernetesEmulator, request: Any) -> bool:
    content_type = (request.headers or {}).get("Content-Type", "")
    if not (request.action == kmock_enums.action.UPDATE and content_type.startswith("application/apply-patch")
            and request.subresource is None and isinstance(request.data, dict)):
        return False
    key = (request.resource, request.namespace, request.name)
    return key not in emulator.objects or emulator.objects[key].deleted


class ServerEmulator(ApplyingEmulator):
    """Objects carry what an API server sets: a ``uid`` and ``creationTimestamp`` at creation, a new
    ``resourceVersion`` at every write, a ``generation`` that grows when the ``spec`` changes (not on writes to
    the status subresource). A JSON patch whose ``test`` fails gets HTTP 422 (kopf's optimistic concurrency)."""

    _versions = itertools.count(1)

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and request.action in (kmock_enums.action.CREATE,
                                                               kmock_enums.action.UPDATE):
            self._stamp(request)
        return await super()._handle(request)

    def _stamp(self, request: Any) -> None:
        version = str(next(self._versions))
        data = request.data
        if request.action == kmock_enums.action.CREATE or _is_creating_apply(self, request):
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                meta.update(uid=str(uuid.uuid4()), resourceVersion=version, generation=1,
                            creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
            return
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return  # the emulator answers 404
        current = self.objects[key].raw
        if isinstance(data, list):  # JSON patch
            for op in data:
                if op.get("op") == "test" and _pointer(current, op["path"]) != op.get("value"):
                    raise kmock.KubernetesError(status=422, reason="Invalid",
                                                    message=f"the test of {op['path']} failed")
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            return
        if not isinstance(data, dict):
            return
        meta = data.setdefault("metadata", {})
        meta["resourceVersion"] = version
        if request.subresource is None and "spec" in data:
            patched = kmock_dicts.patch_dict(current, {"spec": data["spec"]})
            if patched.get("spec") != current.get("spec"):
                meta["generation"] = int((current.get("metadata") or {}).get("generation") or 1) + 1


def _pointer(obj: Any, path: str) -> Any:
    for part in path.strip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


class KubeServer:
    """kmock on 127.0.0.1 in its own event-loop thread, with a kubeconfig file pointing at it."""

    RESOURCES: dict[str, dict[str, Any]] = {
        "v1/namespaces": dict(kind="Namespace", namespaced=False),
        "v1/configmaps": dict(kind="ConfigMap", namespaced=True),
        "v1/pods": dict(kind="Pod", namespaced=True, subresources={"log"}),
        "batch/v1/jobs": dict(kind="Job", namespaced=True, subresources={"status"}),
    }

    def __init__(self, workdir: Path, *, resources: dict[str, dict[str, Any]] | None = None,
                 emulator: type[kmock.KubernetesEmulator] = ApplyingEmulator):
        self.workdir = workdir
        self.resources = self.RESOURCES if resources is None else resources
        self.emulator = emulator
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> KubeServer:
        self.thread.start()
        self.handler, self.server = self.call(self._start())
        self.url = str(self.server.url).rstrip("/")
        self.kubeconfig = self.workdir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}},
                         {"name": "nowhere", "cluster": {"server": "http://127.0.0.1:9"}}],
            "users": [{"name": "tester", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}},
                         {"name": "nowhere", "context": {"cluster": "nowhere", "user": "tester"}}],
        }))
        return self

    async def _start(self) -> tuple[Any, Any]:
        handler = self.emulator()
        for res, info in self.resources.items():
            handler.resources[res] = kmock.ResourceInfo(**info)
        await handler.__aenter__()
        server = kmock.Server(handler)
        await server.__aenter__()
        return handler, server

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def __exit__(self, *exc: Any) -> None:
        async def stop() -> None:
            await self.server.__aexit__(None, None, None)
            await self.handler.__aexit__(None, None, None)

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def cluster(self, **kw: Any) -> kx.Cluster:
        return kx.connect(kubeconfig=str(self.kubeconfig), **kw)

    def requests(self, method: str | None = None) -> list[Any]:
        return [r for r in list(self.handler) if method is None or str(r.method.value) == method]


def jobs_in(cluster: kx.Cluster, namespace: str = NAMESPACE) -> dict[str, dict[str, Any]]:
    items = cluster._call("list", cluster.batch.list_namespaced_job, namespace)["items"]
    return {j["metadata"]["name"]: j for j in items}


# ---------------------------------------------------------------------------------------------- the "cluster"


class JobRunner:
    """Job controller + kubelet + Kueue for the tests, driving the kmock API over HTTP like the real ones.

    ``exit_codes`` maps a stage to the exit code its containers end with instead of running (a pod that rejects
    its configuration, a crash). Suspended Jobs are admitted (``spec.suspend: false``) only once ``admit`` is set.
    ``started`` records the Jobs in the order their pods ran.
    """

    def __init__(self, server: KubeServer, exit_codes: dict[str, int] | None = None, admit: bool = True):
        self.cluster = server.cluster()
        self.exit_codes = exit_codes or {}
        self.admit = threading.Event()
        if admit:
            self.admit.set()
        self.started: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tmp = tempfile.TemporaryDirectory()

    def __enter__(self) -> JobRunner:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._tmp.cleanup()
        assert not self.errors, self.errors

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for name, job in sorted(jobs_in(self.cluster).items()):
                    if (job.get("status") or {}).get("conditions"):
                        continue  # finished
                    if job["spec"].get("suspend"):
                        if self.admit.is_set():
                            self._patch(name, {"spec": {"suspend": False}})
                        continue
                    self._run(name, job)
            except BaseException as e:  # surfaced by __exit__
                self.errors.append(e)
                return
            self._stop.wait(0.02)

    def _patch(self, name: str, body: dict[str, Any]) -> None:
        self.cluster._call("patch", self.cluster.batch.patch_namespaced_job, name, NAMESPACE, body)

    def _status(self, name: str, status: dict[str, Any]) -> None:
        self.cluster._call("status", self.cluster.batch.patch_namespaced_job_status, name, NAMESPACE,
                           {"status": status})

    def _run(self, name: str, job: dict[str, Any]) -> None:
        self.started.append(name)
        spec = job["spec"]
        n = spec.get("completions", 1)
        self._status(name, {"active": n})
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        stage = container["name"]
        codes = [self._pod(pod, index, spec.get("completionMode") == "Indexed") for index in range(n)]
        failed = [c for c in codes if c != 0]
        if not failed:
            self._status(name, {"active": 0, "succeeded": n, "conditions": [
                {"type": "SuccessCriteriaMet", "status": "True"}, {"type": "Complete", "status": "True"}]})
            return
        # The Job's own podFailurePolicy decides, as the job controller does.
        reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
        for i, rule in enumerate(spec["podFailurePolicy"]["rules"]):
            on = rule.get("onExitCodes")
            if rule["action"] == "FailJob" and on and on.get("containerName") in (None, stage) \
                    and failed[0] in on["values"]:
                reason = "PodFailurePolicy"
                message = (f"Container {stage} for pod {NAMESPACE}/{name}-0-x failed with exit code {failed[0]} "
                           f"matching FailJob rule at index {i}")
                break
        self._status(name, {"active": 0, "failed": len(failed), "succeeded": n - len(failed), "conditions": [
            {"type": "FailureTarget", "status": "True", "reason": reason, "message": message},
            {"type": "Failed", "status": "True", "reason": reason, "message": message}]})

    def _pod(self, pod: dict[str, Any], index: int, indexed: bool) -> int:
        container = pod["containers"][0]
        if container["name"] in self.exit_codes:
            return self.exit_codes[container["name"]]
        from alignfake.cli import cli

        # The ConfigMap's spec at the path the Job mounts it.
        cm_name = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
        cm = self.cluster._call("cm", self.cluster.core.read_namespaced_config_map, cm_name, NAMESPACE)
        spec_file = Path(self._tmp.name) / "experiment.yaml"
        spec_file.write_text(cm["data"][render.SPEC_FILE])
        args = [str(spec_file) if a == render.SPEC_PATH else a for a in container["args"]]
        assert container["command"] == ["alignfake"]
        old = os.environ.get("JOB_COMPLETION_INDEX")
        if indexed:
            os.environ["JOB_COMPLETION_INDEX"] = str(index)
        try:
            cli.main(args, prog_name="alignfake", standalone_mode=False)
            return 0
        except SystemExit as e:
            return int(e.code or 0)
        except AlignfakeError as e:
            return e.exit_code
        finally:
            if old is None:
                os.environ.pop("JOB_COMPLETION_INDEX", None)
            else:
                os.environ["JOB_COMPLETION_INDEX"] = old


# ---------------------------------------------------------------------------------------------- experiments


def experiment_data(tmp_path: Path, *, models: tuple[str, ...] = ("alpha", "beta"), queue: str | None = None,
                    **k8s: Any) -> dict[str, Any]:
    """A two-model mock-engine experiment over 10 demo queries (2 shards), stored under ``tmp_path/store``
    with a volume claim, so that submit (here) and the pods (JobRunner) share the store."""
    return {
        "apiVersion": "alignfake.dev/v1alpha1", "kind": "Experiment", "metadata": {"name": "kube-test"},
        "spec": {
            "storage": str(tmp_path / "store"),
            "models": [{"name": m, "base": "mock:hash", "provider": "mock"} for m in models],
            "evaluation": {"queries": {"source": "builtin:demo_queries", "limit": 10}, "shard_size": 5},
            "judges": {"af_reasoning": {"votes": 1}},
            "kubernetes": {"namespace": NAMESPACE, "volume_claim": "shared-runs", "sample_shards": 2,
                           **({"queue": queue} if queue else {}), **k8s},
        },
    }


def write_spec(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def store_state(data: dict[str, Any]) -> dict[tuple[str, str | None], str]:
    """(stage, model) -> done, partial, pending or stale, as the store says."""
    from alignfake.executors.local import experiment_status
    from alignfake.stages.common import Context
    from alignfake.store import store_for

    exp = parse_experiment(data)
    return {(r.stage, r.model): r.state for r in experiment_status(Context(exp, store_for(exp)))}
