"""submit, status, logs and cancel against a Kubernetes API served by kmock on loopback, through the official
kubernetes client over real HTTP.

kmock stores objects but runs no controllers, so ``JobRunner`` (tests/kube_fakes.py) plays the job controller,
the kubelet and Kueue: it picks up each Job the CLI applies, runs its pods as the real ``alignfake stage`` command
(args taken from the Job, the spec file from the ConfigMap, ``JOB_COMPLETION_INDEX`` set per index), and writes
the Job's status (``Complete``, or ``Failed`` by the Job's own ``podFailurePolicy``). Suspended Jobs stay suspended
until the test lets "Kueue" admit them. The stages commit to a local store in a temporary directory, which submit
reads.

Real-cluster tests are opt-in: ``ALIGNFAKE_CLUSTER_TESTS=1`` with a kubeconfig whose current context may be
written to (``@pytest.mark.cluster``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

kmock = pytest.importorskip("kmock")
pytest.importorskip("kubernetes")

from kube_fakes import (  # noqa: E402  (the API server and the job controller, shared with test_operator.py)
    NAMESPACE,
    JobRunner,
    KubeServer,
    experiment_data,
    jobs_in,
    store_state,
    write_spec,
)

from alignfake.errors import StaleOutputError  # noqa: E402
from alignfake.executors import kubernetes as kx  # noqa: E402
from alignfake.k8s import commands, render  # noqa: E402
from alignfake.spec import parse_experiment  # noqa: E402

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def server(tmp_path: Path) -> Iterator[KubeServer]:
    with KubeServer(tmp_path) as s:
        yield s


def cli(server: KubeServer, command: Any, *args: str) -> Any:
    return CliRunner().invoke(command, [*args, "--kubeconfig", str(server.kubeconfig)], catch_exceptions=False)


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
from kube_fakes import KubeServer
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
