"""submit, status, logs and cancel against a Kubernetes API served by kmock on loopback, through the official
kubernetes client over real HTTP.

kmock stores objects but runs no controllers, so ``JobRunner`` plays the job controller, the kubelet and Kueue:
it picks up each Job the CLI applies, runs its pods as the real ``alignfake stage`` command (args taken from the
Job, the spec file from the ConfigMap, ``JOB_COMPLETION_INDEX`` set per index), and writes the Job's status
(``Complete``, or ``Failed`` by the Job's own ``podFailurePolicy``). Suspended Jobs stay suspended until the test
lets "Kueue" admit them. The stages commit to a local store in a temporary directory, which submit reads.

Real-cluster tests are opt-in: ``ALIGNFAKE_CLUSTER_TESTS=1`` with a kubeconfig whose current context may be
written to (``@pytest.mark.cluster``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

kmock = pytest.importorskip("kmock")
pytest.importorskip("kubernetes")

from kmock._internal import enums as kmock_enums  # noqa: E402  (action names of kmock requests)

from alignfake.errors import AlignfakeError, StaleOutputError  # noqa: E402
from alignfake.executors import kubernetes as kx  # noqa: E402
from alignfake.k8s import commands, render  # noqa: E402
from alignfake.spec import parse_experiment  # noqa: E402

NAMESPACE = "lab"
TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------- the API server


class ApplyingEmulator(kmock.KubernetesEmulator):
    """kmock's emulator creates objects on POST only. A real API server also creates an absent object on a
    server-side apply (PATCH with ``application/apply-patch+yaml``); this adds that, and nothing else."""

    async def _handle(self, request: Any) -> Any:
        content_type = (request.headers or {}).get("Content-Type", "")
        if (request.action == kmock_enums.action.UPDATE and content_type.startswith("application/apply-patch")
                and request.subresource is None and isinstance(request.data, dict)):
            key = (request.resource, request.namespace, request.name)
            async with self._lock:
                if key not in self.objects:
                    self.objects[key] = request.data
                elif self.objects[key].deleted:
                    self.objects[key].create(request.data)
        return await super()._handle(request)


class KubeServer:
    """kmock on 127.0.0.1 in its own event-loop thread, with a kubeconfig file pointing at it."""

    RESOURCES = {
        "v1/namespaces": dict(kind="Namespace", namespaced=False),
        "v1/configmaps": dict(kind="ConfigMap", namespaced=True),
        "v1/pods": dict(kind="Pod", namespaced=True, subresources={"log"}),
        "batch/v1/jobs": dict(kind="Job", namespaced=True, subresources={"status"}),
    }

    def __init__(self, workdir: Path):
        self.workdir = workdir
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
        handler = ApplyingEmulator()
        for res, info in self.RESOURCES.items():
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
        container = spec["template"]["spec"]["containers"][0]
        stage = container["name"]
        codes = [self._pod(container, index, spec.get("completionMode") == "Indexed") for index in range(n)]
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

    def _pod(self, container: dict[str, Any], index: int, indexed: bool) -> int:
        if container["name"] in self.exit_codes:
            return self.exit_codes[container["name"]]
        from alignfake.cli import cli

        # The ConfigMap's spec at the path the Job mounts it.
        cm_name = next(v["configMap"]["name"] for v in self._volumes(container) if "configMap" in v)
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

    def _volumes(self, container: dict[str, Any]) -> list[dict[str, Any]]:
        job = jobs_in(self.cluster)
        for j in job.values():
            if j["spec"]["template"]["spec"]["containers"][0]["name"] == container["name"]:
                return j["spec"]["template"]["spec"]["volumes"]
        raise AssertionError("job vanished")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def server(tmp_path: Path) -> Iterator[KubeServer]:
    with KubeServer(tmp_path) as s:
        yield s


def experiment_data(tmp_path: Path, *, models: tuple[str, ...] = ("alpha", "beta"), queue: str | None = None,
                    **k8s: Any) -> dict[str, Any]:
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


def cli(server: KubeServer, command: Any, *args: str) -> Any:
    return CliRunner().invoke(command, [*args, "--kubeconfig", str(server.kubeconfig)], catch_exceptions=False)


def store_state(data: dict[str, Any]) -> dict[tuple[str, str | None], str]:
    from alignfake.executors.local import experiment_status
    from alignfake.stages.common import Context
    from alignfake.store import store_for

    exp = parse_experiment(data)
    return {(r.stage, r.model): r.state for r in experiment_status(Context(exp, store_for(exp)))}


def run_stage_locally(spec: Path, *args: str) -> None:
    from alignfake.cli import cli as main_cli

    result = CliRunner().invoke(main_cli, ["stage", *args[:1], str(spec), *args[1:]], catch_exceptions=False)
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------- submit


def test_submit_applies_the_spec_and_only_the_first_stage_with_server_side_apply(
        server: KubeServer, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, experiment_data(tmp_path))
    result = cli(server, commands.submit, str(spec), "--output", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["state"] == "submitted" and out["stage"] == "sample"
    assert out["applied"] == ["kube-test-sample-alpha", "kube-test-sample-beta"]

    cluster = server.cluster()
    assert sorted(jobs_in(cluster)) == ["kube-test-sample-alpha", "kube-test-sample-beta"]
    cm = cluster._call("cm", cluster.core.read_namespaced_config_map, "kube-test-spec", NAMESPACE)
    assert parse_experiment(yaml.safe_load(cm["data"]["experiment.yaml"])) == parse_experiment(
        yaml.safe_load(spec.read_text()))
    # Every write is a server-side apply by the alignfake field manager.
    writes = server.requests("PATCH") + server.requests("POST") + server.requests("PUT")
    assert len(writes) == 3
    for r in writes:
        assert r.method.value == "PATCH"
        assert r.headers["Content-Type"] == "application/apply-patch+yaml"
        assert r.params["fieldManager"] == "alignfake"
    job = jobs_in(cluster)["kube-test-sample-alpha"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "2"


@pytest.mark.slow
def test_submit_wait_runs_each_stage_after_the_previous_one(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path)
    spec = write_spec(tmp_path, data)
    with JobRunner(server) as runner:
        result = cli(server, commands.submit, str(spec), "--wait", "--poll", "0.05", "--timeout", "120", "--output", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "done"
    assert runner.started == ["kube-test-sample-alpha", "kube-test-sample-beta", "kube-test-classify-alpha",
                              "kube-test-classify-beta", "kube-test-reduce"]
    assert set(store_state(data).values()) == {"done"}
    assert "store: alpha 2/2, beta 2/2" in result.stderr  # progress the store vouches for
    assert "sample/alpha: succeeded" in result.stderr


def test_resubmission_starts_at_the_first_unfinished_stage(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path)
    spec = write_spec(tmp_path, data)
    run_stage_locally(spec, "sample", "--model", "alpha")  # alpha sampled, beta not
    result = cli(server, commands.submit, str(spec), "--output", "json")
    assert json.loads(result.stdout)["applied"] == ["kube-test-sample-beta"]

    run_stage_locally(spec, "sample", "--model", "beta")
    run_stage_locally(spec, "classify", "--model", "alpha")
    result = cli(server, commands.submit, str(spec), "--output", "json")
    out = json.loads(result.stdout)
    assert (out["stage"], out["applied"]) == ("classify", ["kube-test-classify-beta"])
    assert sorted(jobs_in(server.cluster())) == ["kube-test-classify-beta", "kube-test-sample-beta"]


def test_a_finished_job_is_replaced_when_its_stage_is_still_unfinished(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path, models=("alpha",))
    spec = write_spec(tmp_path, data)
    with JobRunner(server, exit_codes={"sample": 1}):
        failed = cli(server, commands.submit, str(spec), "--wait", "--poll", "0.05", "--timeout", "120")
    assert failed.exit_code == 1
    with JobRunner(server) as runner:
        result = cli(server, commands.submit, str(spec), "--wait", "--poll", "0.05", "--timeout", "120")
    assert result.exit_code == 0, result.output
    assert "replacing finished Job kube-test-sample-alpha (failed)" in result.stderr
    assert runner.started[0] == "kube-test-sample-alpha"
    assert set(store_state(data).values()) == {"done"}
    deletes = server.requests("DELETE")
    assert deletes and all(r.params.get("propagationPolicy") == "Background" for r in deletes)


def test_a_failed_job_stops_submit_with_a_clear_error(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path, models=("alpha",))
    spec = write_spec(tmp_path, data)
    with JobRunner(server, exit_codes={"classify": 2}) as runner:
        result = cli(server, commands.submit, str(spec), "--wait", "--poll", "0.05", "--timeout", "120")
    assert result.exit_code == 1
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith("error: classify/alpha: Job lab/kube-test-classify-alpha failed (PodFailurePolicy)")
    assert "exit code 2" in err and "fix the spec" in err
    assert f"alignfake logs {spec} --stage classify --model alpha" in err
    assert runner.started == ["kube-test-sample-alpha", "kube-test-classify-alpha"]  # reduce never applied
    assert "kube-test-reduce" not in jobs_in(server.cluster())


def test_a_job_suspended_by_kueue_is_queued_not_failed(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path, models=("alpha",), queue="gpu-queue")
    spec = write_spec(tmp_path, data)
    result = cli(server, commands.submit, str(spec), "--output", "json")
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    assert out["state"] == "queued"
    assert [j["state"] for j in out["jobs"]] == ["queued"]
    job = jobs_in(server.cluster())["kube-test-sample-alpha"]
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    rows = commands.job_status(parse_experiment(data), kubeconfig=str(server.kubeconfig))
    assert {(r["job"], r["state"]) for r in rows} == {
        ("kube-test-sample-alpha", "queued"), ("kube-test-classify-alpha", "absent"), ("kube-test-reduce", "absent")}

    # With --wait the queued Job is watched, not failed; once "Kueue" admits it the stages go on.
    with JobRunner(server, admit=False) as runner:
        seen: list[str] = []

        def log(line: str) -> None:
            seen.append(line)
            if "queued" in line:
                runner.admit.set()

        res = kx.submit(parse_experiment(data), server.cluster(), wait=True, poll_s=0.05, timeout_s=120, log=log)
    assert res.state == "done"
    assert "sample/alpha: queued: suspended until Kueue admits it" in seen
    assert any(line.startswith("sample/alpha: succeeded") for line in seen)


def test_a_running_job_from_another_spec_version_is_not_touched(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path, models=("alpha",), queue="q")
    spec = write_spec(tmp_path, data)
    assert cli(server, commands.submit, str(spec)).exit_code == 0  # left queued
    data["spec"]["kubernetes"]["ttl_seconds_after_finished"] = 60
    spec = write_spec(tmp_path, data)
    result = cli(server, commands.submit, str(spec))
    assert result.exit_code == 1
    assert "from another version of the spec" in result.stderr and "alignfake cancel" in result.stderr


def test_stale_outputs_stop_submit_before_anything_is_applied(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path, models=("alpha",))
    run_stage_locally(write_spec(tmp_path, data), "sample", "--model", "alpha")
    data["spec"]["evaluation"]["temperature"] = 0.7  # changes the sample fingerprint
    result = cli(server, commands.submit, str(write_spec(tmp_path, data)))
    assert result.exit_code == StaleOutputError.exit_code
    assert "sample/alpha" in result.stderr and "never replaces committed output" in result.stderr
    assert server.requests("PATCH") == []


def test_a_local_store_needs_a_shared_volume(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path)
    del data["spec"]["kubernetes"]["volume_claim"]
    result = cli(server, commands.submit, str(write_spec(tmp_path, data)))
    assert result.exit_code == 1
    assert "spec.kubernetes.volume_claim" in result.stderr and "s3://" in result.stderr
    assert list(server.handler) == []  # nothing reached the cluster


def test_every_stage_committed_means_nothing_to_apply(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path, models=("alpha",))
    spec = write_spec(tmp_path, data)
    from alignfake.executors.local import run_experiment

    run_experiment(parse_experiment(data), show_progress=False)
    result = cli(server, commands.submit, str(spec), "--wait")
    assert result.exit_code == 0
    assert result.stdout.strip() == "kube-test: every stage is committed"
    assert jobs_in(server.cluster()) == {}


# ---------------------------------------------------------------------------------------------- cancel, status, logs


def test_cancel_deletes_the_experiments_jobs_and_keeps_the_store(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path)
    spec = write_spec(tmp_path, data)
    run_stage_locally(spec, "sample", "--model", "alpha")
    assert cli(server, commands.submit, str(spec)).exit_code == 0
    # Another experiment's Job in the same namespace. (kmock ignores label selectors: the client's own check
    # is what keeps it safe here.)
    other = {"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {"name": "someone-else", "namespace": NAMESPACE,
                          "labels": {"alignfake.dev/experiment": "other"}},
             "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:1.36"}],
                                            "restartPolicy": "Never"}}}}
    server.cluster().apply(other)

    result = cli(server, commands.cancel, str(spec), "--output", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["deleted"] == ["kube-test-sample-beta"]
    assert sorted(jobs_in(server.cluster())) == ["someone-else"]
    assert all(r.params.get("propagationPolicy") == "Background" for r in server.requests("DELETE"))
    assert store_state(data)[("sample", "alpha")] == "done"  # the store is kept

    again = cli(server, commands.cancel, str(spec))
    assert again.exit_code == 0 and "no Jobs" in again.stdout


def test_job_status_reports_each_jobs_state(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path, models=("alpha",))
    spec = write_spec(tmp_path, data)
    with JobRunner(server, exit_codes={"classify": 1}):
        assert cli(server, commands.submit, str(spec), "--wait", "--poll", "0.05", "--timeout", "120").exit_code == 1
    rows = {r["job"]: r for r in commands.job_status(parse_experiment(data), kubeconfig=str(server.kubeconfig))}
    assert rows["kube-test-sample-alpha"]["state"] == "succeeded"
    assert rows["kube-test-sample-alpha"]["succeeded"] == rows["kube-test-sample-alpha"]["completions"] == 2
    assert rows["kube-test-classify-alpha"]["state"] == "failed"
    assert rows["kube-test-classify-alpha"]["reason"] == "BackoffLimitExceeded"
    assert rows["kube-test-reduce"]["state"] == "absent"


def _pod(name: str, job: str, index: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"batch.kubernetes.io/job-name": job},
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "spec": {"containers": [{"name": "sample", "image": "x:1"}]}}


@pytest.mark.parametrize("follow", [False, True])
def test_logs_prints_each_pods_lines(server: KubeServer, tmp_path: Path, follow: bool) -> None:
    data = experiment_data(tmp_path, models=("alpha",))
    spec = write_spec(tmp_path, data)
    h = server.handler
    # Created out of index order; logs come in index order.
    for name, index in (("kube-test-sample-alpha-1-bbbbb", 1), ("kube-test-sample-alpha-0-aaaaa", 0)):
        server.cluster().core.create_namespaced_pod(NAMESPACE, _pod(name, "kube-test-sample-alpha", index))
        h["get", kmock.resource("v1/pods"), kmock.name(name), kmock.subresource("log")] << (
            f"worker {index} starting\nworker {index} committed shard {index}\n".encode())
    args = [str(spec), "--stage", "sample", "--model", "alpha"] + (["--follow"] if follow else [])
    result = cli(server, commands.logs, *args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    expected = ["[kube-test-sample-alpha-0-aaaaa] worker 0 starting",
                "[kube-test-sample-alpha-0-aaaaa] worker 0 committed shard 0",
                "[kube-test-sample-alpha-1-bbbbb] worker 1 starting",
                "[kube-test-sample-alpha-1-bbbbb] worker 1 committed shard 1"]
    if follow:  # interleaving across pods is arrival order; each pod's lines stay in order
        assert sorted(lines) == sorted(expected)
        assert [ln for ln in lines if "-0-" in ln] == expected[:2]
    else:
        assert lines == expected
    log_reads = [r for r in server.requests("GET") if r.subresource == "log"]
    assert all(r.params["container"] == "sample" for r in log_reads)
    assert all(r.params.get("follow") == ("True" if follow else "False") for r in log_reads)

    none = cli(server, commands.logs, str(spec), "--stage", "classify")
    assert none.exit_code == 1 and "no pods yet for kube-test-classify-alpha: absent" in none.stderr


# ---------------------------------------------------------------------------------------------- connection


def test_context_selects_the_cluster_like_kubectl(server: KubeServer, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, experiment_data(tmp_path))
    result = cli(server, commands.cancel, str(spec), "--context", "nowhere")
    assert result.exit_code == 1
    assert "cannot reach the Kubernetes API at http://127.0.0.1:9" in result.stderr
    missing = cli(server, commands.cancel, str(spec), "--context", "no-such-context")
    assert missing.exit_code == 1 and "no-such-context" in missing.stderr


def test_without_any_configuration_the_error_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kx.ClusterError, match="pass --kubeconfig, set \\$KUBECONFIG"):
        kx.connect()


def test_kubeconfig_from_the_environment_is_used(server: KubeServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig))
    data = experiment_data(tmp_path, models=("alpha",))
    rows = commands.job_status(parse_experiment(data))
    assert [r["state"] for r in rows] == ["absent", "absent", "absent"]
    assert server.requests("GET")


def test_submit_never_imports_torch(tmp_path: Path) -> None:
    data = experiment_data(tmp_path, models=("alpha",))
    spec = write_spec(tmp_path, data)
    code = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from test_k8s_submit import KubeServer
from alignfake.k8s import commands
with KubeServer(Path({str(tmp_path)!r})) as server:
    try:
        commands.submit.main([{str(spec)!r}, "--kubeconfig", str(server.kubeconfig)], standalone_mode=False)
    except SystemExit as e:
        assert not e.code, e.code
print(json.dumps(sorted(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TESTS.parent)
    assert out.returncode == 0, out.stderr
    mods = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "kubernetes" in mods  # it did talk to the API server
    heavy = sorted(m for m in mods if m.split(".")[0] in ("torch", "transformers", "vllm", "peft", "accelerate"))
    assert heavy == []


# ---------------------------------------------------------------------------------------------- real cluster


@pytest.mark.cluster
@pytest.mark.skipif(os.environ.get("ALIGNFAKE_CLUSTER_TESTS") != "1",
                    reason="real-cluster test: set ALIGNFAKE_CLUSTER_TESTS=1 with a writable kubeconfig context")
def test_real_cluster_accepts_the_rendered_jobs_by_server_side_dry_run(tmp_path: Path) -> None:
    """The API server's own validation (admission included) of every rendered object, without creating
    anything: server-side apply with dryRun=All."""
    data = experiment_data(tmp_path, queue=None)
    data["spec"]["kubernetes"]["namespace"] = os.environ.get("ALIGNFAKE_TEST_NAMESPACE", "default")
    cluster = kx.connect()
    for obj in render.render_experiment(parse_experiment(data)).objects():
        meta = obj["metadata"]
        fn = {"ConfigMap": cluster.core.patch_namespaced_config_map,
              "Job": cluster.batch.patch_namespaced_job}[obj["kind"]]
        cluster._call("dry-run", fn, meta["name"], meta["namespace"], obj, field_manager=kx.FIELD_MANAGER,
                      force=True, dry_run="All", _content_type=kx.APPLY_PATCH)


def test_status_command_shows_store_and_jobs(server: KubeServer, tmp_path: Path) -> None:
    from alignfake.cli import cli as main_cli

    data = experiment_data(tmp_path, models=("alpha",))
    spec = write_spec(tmp_path, data)
    with JobRunner(server, exit_codes={"classify": 1}):
        assert cli(server, commands.submit, str(spec), "--wait", "--poll", "0.05", "--timeout", "120").exit_code == 1
    res = CliRunner().invoke(main_cli, ["status", str(spec), "--kubeconfig", str(server.kubeconfig), "-o", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert {(r["stage"], r["state"]) for r in doc["store"]} >= {("sample", "done"), ("classify", "pending")}
    assert {j["job"]: j["state"] for j in doc["jobs"]}["kube-test-classify-alpha"] == "failed"
    # an unreachable cluster still shows the store, with the reason
    res = CliRunner().invoke(main_cli, ["status", str(spec), "--kubeconfig", str(server.kubeconfig),
                                        "--context", "nowhere", "-o", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["store"] and "error" in doc["jobs"]
