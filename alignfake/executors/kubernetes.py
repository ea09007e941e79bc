"""The Kubernetes executor: apply an experiment's stages as Jobs, one stage after the other, and watch them.

``submit`` finds the first stage whose output is not committed in the store (the store is the truth, not the
cluster: a resubmitted experiment starts where its committed output ends), applies the ConfigMap and that
stage's Jobs with server-side apply (field manager ``alignfake``), and with ``wait`` polls the Jobs until they
finish, then goes on with the next stage. Kueue's admission shows as a suspended Job: reported as queued,
never as a failure. A failed Job stops the submission with its reason and the command that shows its logs.

The operator (``alignfake/operator.py``) drives the same functions from the cluster: ``first_unfinished``,
``apply_stage``, ``job_state`` and the messages below are shared, so both front doors behave alike.

Cluster access works like kubectl's: ``--kubeconfig`` / ``--context``, else ``$KUBECONFIG`` or
``~/.kube/config``, else the in-cluster service account. The official ``kubernetes`` client is imported
here only, lazily, by the commands that talk to a cluster.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import AlignfakeError, StaleOutputError
from ..k8s.render import (
    ANNOTATION_SPEC_HASH,
    LABEL_EXPERIMENT,
    LABEL_KUEUE_QUEUE,
    STAGES,
    Manifests,
    StageJob,
    render_experiment,
)
from ..spec import Experiment

FIELD_MANAGER = "alignfake"
APPLY_PATCH = "application/apply-patch+yaml"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# (connect, read) seconds for API calls: an unreachable cluster fails in seconds, before any GPU is requested.
REQUEST_TIMEOUT = (10, 60)

Log = Callable[[str], None]


class ClusterError(AlignfakeError):
    """The cluster cannot be reached, refused a request, or the experiment's Jobs are in a state we cannot
    continue from."""


class JobFailedError(ClusterError):
    """A stage's Job failed; the message names it, its reason, and how to see its logs."""


# ------------------------------------------------------------------------------------------------ client


class Cluster:
    """The few Kubernetes API calls alignfake makes, on plain dicts (JSON as the API server sends it)."""

    def __init__(self, api_client: Any):
        from kubernetes import client

        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)

    @property
    def host(self) -> str:
        return str(self.api_client.configuration.host)

    # -- generic call wrapper -----------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False, **kw: Any) -> Any:
        """Run one API call with ``_preload_content=False`` and return the decoded JSON body; ``None`` for a
        404 when ``missing_ok``. Every failure becomes a ClusterError that names the call."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        kw.setdefault("_request_timeout", REQUEST_TIMEOUT)
        try:
            resp = fn(*args, _preload_content=False, **kw)
        except ApiException as e:
            if e.status == 404 and missing_ok:
                return None
            raise ClusterError(f"{what}: {_api_message(e)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ClusterError(f"{what}: cannot reach the Kubernetes API at {self.host}: {e}") from None
        data = resp.data
        return json.loads(data) if data else {}

    # -- objects ------------------------------------------------------------------------------------------
    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of a ConfigMap or Job we own (``force``: a field someone else set by hand on an
        object we manage is taken back, as controllers do)."""
        meta = obj["metadata"]
        kind = obj["kind"]
        fn = {"ConfigMap": self.core.patch_namespaced_config_map, "Job": self.batch.patch_namespaced_job}[kind]
        return self._call(
            f"apply {kind} {meta['namespace']}/{meta['name']}", fn, meta["name"], meta["namespace"], obj,
            field_manager=FIELD_MANAGER, force=True, _content_type=APPLY_PATCH,
        )

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._call(f"get Job {namespace}/{name}", self.batch.read_namespaced_job, name, namespace,
                          missing_ok=True)

    def list_jobs(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        items = self._call(f"list Jobs in {namespace}", self.batch.list_namespaced_job, namespace,
                           label_selector=_selector(labels))["items"]
        # The API server applies the selector; checking again costs nothing and guarantees that a proxy (or a
        # mock) that ignores it can never make us touch another experiment's Jobs.
        return [j for j in items if _has_labels(j, labels)]

    def delete_job(self, namespace: str, name: str) -> bool:
        """Delete a Job; its pods are removed by the garbage collector afterwards (propagation: background).
        False if it did not exist."""
        out = self._call(f"delete Job {namespace}/{name}", self.batch.delete_namespaced_job, name, namespace,
                         propagation_policy="Background", missing_ok=True)
        return out is not None

    def get_custom(self, api_version: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A custom resource as the API server has it now; None if it does not exist."""
        from kubernetes import client

        group, version = api_version.split("/")
        return self._call(f"get {plural}.{group} {namespace}/{name}",
                          client.CustomObjectsApi(self.api_client).get_namespaced_custom_object,
                          group, version, namespace, plural, name, missing_ok=True)

    def patch_status(self, api_version: str, plural: str, namespace: str, name: str,
                     status: dict[str, Any]) -> bool:
        """JSON merge patch of a custom resource's ``status`` subresource (keys set to None are removed). False if
        the object is gone."""
        from kubernetes import client

        group, version = api_version.split("/")
        out = self._call(
            f"update the status of {plural}.{group} {namespace}/{name}",
            client.CustomObjectsApi(self.api_client).patch_namespaced_custom_object_status,
            group, version, namespace, plural, name, {"status": status},
            _content_type="application/merge-patch+json", missing_ok=True,
        )
        return out is not None

    def wait_job_gone(self, namespace: str, name: str, timeout_s: float = 60.0, poll_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout_s
        while self.get_job(namespace, name) is not None:
            if time.monotonic() > deadline:
                raise ClusterError(f"Job {namespace}/{name} is still there {timeout_s:.0f}s after its deletion")
            time.sleep(poll_s)

    def list_pods(self, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
        items = self._call(f"list pods in {namespace}", self.core.list_namespaced_pod, namespace,
                           label_selector=_selector(labels))["items"]
        return [p for p in items if _has_labels(p, labels)]

    def pod_log_lines(self, namespace: str, pod: str, container: str, follow: bool) -> Iterator[str]:
        """The pod's log, line by line (following it while the container runs when ``follow``)."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self.core.read_namespaced_pod_log(
                pod, namespace, container=container, follow=follow, _preload_content=False,
                _request_timeout=(REQUEST_TIMEOUT[0], None) if follow else REQUEST_TIMEOUT,
            )
        except ApiException as e:
            raise ClusterError(f"logs of pod {namespace}/{pod}: {_api_message(e)}") from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise ClusterError(f"logs of pod {namespace}/{pod}: cannot reach {self.host}: {e}") from None
        buf = b""
        try:
            for chunk in resp.stream(4096, decode_content=True):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace")
            if buf:
                yield buf.decode("utf-8", errors="replace")
        finally:
            resp.release_conn()


def _api_message(e: Any) -> str:
    message = e.reason or ""
    try:
        body = json.loads(e.body)
        message = body.get("message") or message
    except (TypeError, ValueError):
        pass
    hint = {
        401: " (check the credentials of your kubeconfig context)",
        403: " (RBAC: alignfake needs get/list/create/patch/delete on jobs, get/create/patch on configmaps, "
             "list on pods and get on pods/log in the namespace)",
    }.get(e.status, "")
    return f"HTTP {e.status}: {message}{hint}"


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _has_labels(obj: dict[str, Any], labels: dict[str, str]) -> bool:
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


def connect(context: str | None = None, kubeconfig: str | None = None) -> Cluster:
    """A Cluster as kubectl would reach it: an explicit ``kubeconfig``/``context``, else ``$KUBECONFIG`` or
    ``~/.kube/config``, else the pod's service account when running inside a cluster."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    default = Path(os.path.expanduser("~/.kube/config"))
    # $KUBECONFIG is read now, as kubectl does (the client reads it once, at import); a list of files
    # separated by ':' is merged by the client.
    config_file = kubeconfig or os.environ.get("KUBECONFIG") or str(default)
    try:
        if kubeconfig or context or os.environ.get("KUBECONFIG") or default.exists():
            return Cluster(config.new_client_from_config(config_file=config_file, context=context))
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return Cluster(client.ApiClient(cfg))
    except (ConfigException, OSError, ValueError, TypeError) as e:
        raise ClusterError(f"cannot load the Kubernetes configuration ({config_file}"
                           f"{', context ' + context if context else ''}): {e}") from None
    raise ClusterError("no Kubernetes configuration: pass --kubeconfig, set $KUBECONFIG, create ~/.kube/config, "
                       "or run inside a cluster")


# ------------------------------------------------------------------------------------------------ job state


@dataclass(frozen=True)
class JobState:
    """What a Job is doing, from its status. ``state`` is one of: absent, queued (suspended by Kueue, waiting
    for admission), suspended (suspended without a queue), pending (admitted, no pod running yet), running,
    succeeded, failed."""

    state: str
    active: int = 0
    succeeded: int = 0
    failed: int = 0
    completions: int = 1
    reason: str = ""
    message: str = ""

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed")

    def describe(self) -> str:
        if self.state == "absent":
            return "absent"
        if self.state == "queued":
            return "queued: suspended until Kueue admits it"
        counts = f"{self.succeeded}/{self.completions} done, {self.active} running"
        if self.failed:
            counts += f", {self.failed} failed pod(s)"
        if self.state == "failed":
            return f"failed ({self.reason}): {self.message}" if self.message else f"failed ({self.reason})"
        return f"{self.state}: {counts}"


def job_state(job: dict[str, Any] | None) -> JobState:
    if job is None:
        return JobState("absent", completions=0)
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if str(c.get("status")) == "True"}
    common = dict(active=int(status.get("active") or 0), succeeded=int(status.get("succeeded") or 0),
                  failed=int(status.get("failed") or 0), completions=int(spec.get("completions") or 1))
    # FailureTarget / SuccessCriteriaMet come first (1.31+) while the last pods terminate; they are final.
    for kind in ("Failed", "FailureTarget"):
        if kind in true:
            c = true[kind]
            return JobState("failed", reason=c.get("reason") or kind, message=c.get("message") or "", **common)
    if "Complete" in true or "SuccessCriteriaMet" in true:
        return JobState("succeeded", **common)
    if spec.get("suspend") or "Suspended" in true:
        labels = (job.get("metadata") or {}).get("labels") or {}
        return JobState("queued" if LABEL_KUEUE_QUEUE in labels else "suspended", **common)
    return JobState("running" if common["active"] else "pending", **common)


# ------------------------------------------------------------------------------------------------ submit


@dataclass
class SubmitResult:
    experiment: str
    namespace: str
    state: str
    """done (every stage committed), submitted (Jobs applied, not waited for) or queued (applied, waiting
    for Kueue)."""
    stage: str | None
    """The stage applied last (None when everything was already committed)."""
    applied: list[str]
    """Jobs created by this submission, in order."""
    jobs: list[dict[str, Any]]
    """State of the last stage's Jobs when submit returned."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unfinished(ctx: Any) -> tuple[str | None, list[str | None]]:
    """The first stage with pending pieces in the store of ``ctx`` (a ``stages.common.Context``) and the models
    (None for reduce) whose pieces are pending. Raises StaleOutputError when committed output came from other
    inputs: the pods would refuse to run over it anyway."""
    from .local import experiment_status

    return first_unfinished(experiment_status(ctx), ctx.store.uri)


def first_unfinished(rows: list[Any], store_uri: str) -> tuple[str | None, list[str | None]]:
    """``unfinished`` on rows of ``executors.local.experiment_status`` already read from the store at
    ``store_uri``."""
    stale = [r for r in rows if r.stale]
    if stale:
        what = ", ".join(r.stage + (f"/{r.model}" if r.model else "") for r in stale)
        raise StaleOutputError(
            f"the spec changed since these outputs were committed in {store_uri}: {what}. alignfake never "
            "replaces committed output on Kubernetes: delete those outputs from the store (`alignfake status "
            "FILE` lists them), or give the experiment a new metadata.name."
        )
    for stage in STAGES:
        pending = [r.model for r in rows if r.stage == stage and r.pending]
        if pending:
            return stage, pending
    return None, []


def _progress(ctx: Any, stage: str, models: list[str | None]) -> str:
    """Committed pieces of ``stage`` for ``models``, e.g. ``llama 3/8``: progress that the store, not the Jobs,
    vouches for."""
    from .local import experiment_status

    rows = [r for r in experiment_status(ctx) if r.stage == stage and r.model in models]
    return ", ".join(f"{r.model or stage} {r.committed}/{r.committed + r.pending}" for r in rows)


def ensure_job(cluster: Cluster, job: StageJob, log: Log) -> bool:
    """Make sure ``job`` exists as rendered. A finished Job of the same name (from an earlier submission whose
    output is not all committed, or one that failed) is replaced; a running or queued one is kept and watched.
    Returns True if a Job was created."""
    current = cluster.get_job(job.namespace, job.name)
    if current is not None:
        st = job_state(current)
        if not st.finished:
            theirs = ((current.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
            if theirs and theirs != job.spec_hash:
                raise ClusterError(
                    f"Job {job.namespace}/{job.name} is {st.state} from another version of the spec; wait for "
                    "it to finish or delete it with `alignfake cancel FILE`, then submit again"
                )
            log(f"{job.label}: Job {job.name} already exists ({st.describe()}); watching it")
            return False
        log(f"{job.label}: replacing finished Job {job.name} ({st.state})")
        cluster.delete_job(job.namespace, job.name)
        cluster.wait_job_gone(job.namespace, job.name)
    cluster.apply(job.manifest)
    log(f"{job.label}: applied Job {job.name}")
    return True


def apply_stage(cluster: Cluster, manifests: Manifests, stage: str, models: list[str | None],
                log: Log) -> tuple[list[StageJob], list[str]]:
    """Ensure the Jobs of ``stage`` for ``models`` (see ``ensure_job``): the stage's Jobs, and the names of
    those created."""
    jobs = manifests.stage_jobs(stage, models)
    log(f"stage {stage}: {len(jobs)} Job(s) for " + ", ".join(j.model or stage for j in jobs))
    return jobs, [j.name for j in jobs if ensure_job(cluster, j, log)]


def wait_for_jobs(
    cluster: Cluster,
    jobs: list[StageJob],
    log: Log,
    *,
    poll_s: float = 10.0,
    timeout_s: float | None = None,
    progress: Callable[[], str] | None = None,
    logs_hint: Callable[[StageJob], str] = lambda j: "",
) -> dict[str, JobState]:
    """Poll the Jobs until all succeeded. Logs a line whenever a Job's state (or the store's progress) changes.
    A failed Job raises JobFailedError; one that disappears (cancelled) or a timeout raises ClusterError."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last: dict[str, str] = {}
    last_progress = ""
    while True:
        states = {j.name: job_state(cluster.get_job(j.namespace, j.name)) for j in jobs}
        for j in jobs:
            line = states[j.name].describe()
            if last.get(j.name) != line:
                log(f"{j.label}: {line}")
                last[j.name] = line
        for j in jobs:
            st = states[j.name]
            if st.state == "failed":
                raise JobFailedError(job_failure_message(j, st) + logs_hint(j))
            if st.state == "absent":
                raise ClusterError(f"{j.label}: Job {j.namespace}/{j.name} disappeared (cancelled?)")
        if progress is not None:
            now = progress()
            if now and now != last_progress:
                log(f"store: {now}")
                last_progress = now
        if all(st.state == "succeeded" for st in states.values()):
            return states
        if deadline is not None and time.monotonic() > deadline:
            waiting = ", ".join(f"{j.name} ({states[j.name].state})" for j in jobs
                                if states[j.name].state != "succeeded")
            raise ClusterError(f"gave up waiting after {timeout_s:.0f}s for {waiting}; the Jobs keep running "
                               "(see `alignfake status FILE`, `alignfake submit FILE --wait` to resume watching)")
        time.sleep(poll_s)


def job_failure_message(job: StageJob, st: JobState) -> str:
    """Why a stage's Job failed, with what its exit code means."""
    return (f"{job.label}: Job {job.namespace}/{job.name} failed ({st.reason})"
            + (f": {st.message}" if st.message else "") + _exit_code_hint(st))


def missing_output_message(store_uri: str, stage: str, models: list[str | None]) -> str:
    """A stage's Jobs all succeeded, yet the store lacks their output: applying them again would loop forever."""
    return (f"the {stage} Jobs succeeded but {store_uri} still lacks their output for "
            f"{', '.join(m or stage for m in models)}: do the pods write to the same store (credentials, "
            "endpoint, volume claim)? See `alignfake logs`.")


def local_store_problem(exp: Experiment, store: Any) -> str | None:
    """Why the experiment's store cannot work for pods, or None: a local path is every pod's own ephemeral
    filesystem unless a shared volume is mounted."""
    from ..store import LocalStore

    if isinstance(store, LocalStore) and not exp.spec.kubernetes.volume_claim:
        return (f"spec.storage is the local path {exp.spec.storage.uri!r}: every pod would write into its own "
                "ephemeral filesystem and no stage would see the previous one's output. Use an s3:// store, or set "
                "spec.kubernetes.volume_claim to a ReadWriteMany PersistentVolumeClaim")
    return None


def _exit_code_hint(st: JobState) -> str:
    if st.reason == "PodFailurePolicy":
        return (". Exit code 2 means the pod rejected the experiment file or a dataset, 3 that the store holds "
                "output from other inputs: fix the spec rather than retrying")
    return ""


def submit(
    exp: Experiment,
    cluster: Cluster,
    *,
    wait: bool = False,
    poll_s: float = 10.0,
    timeout_s: float | None = None,
    log: Log = lambda m: None,
    source: str = "<spec>",
    logs_command: str = "alignfake logs FILE",
) -> SubmitResult:
    """Apply the experiment's first unfinished stage (and, with ``wait``, each following one once the previous
    finished). See the module docstring."""
    from ..stages.common import Context
    from ..store import LocalStore, store_for

    manifests = render_experiment(exp, source)
    store = store_for(exp)
    problem = local_store_problem(exp, store)
    if problem:
        raise ClusterError(problem)
    store.check()
    if isinstance(store, LocalStore):
        log(f"note: the store is the local path {store.uri}; submit reads it here to find finished stages, "
            f"the pods write into volume claim {exp.spec.kubernetes.volume_claim}")

    # One context for the whole submission: it caches the fingerprints (queries and documents are read once);
    # the committed state is read from the store afresh at every call. The first call also reads the
    # datasets: a bad one fails here, before anything reaches the cluster.
    ctx = Context(exp, store)
    stage, models = unfinished(ctx)
    cluster.apply(manifests.configmap)
    store.write_text("spec.yaml", exp.to_yaml())

    applied: list[str] = []
    done_stages: set[str] = set()
    while True:
        if stage is None:
            log("every stage is committed")
            return SubmitResult(exp.name, manifests.namespace, "done", None, applied, [])
        if stage in done_stages:
            raise ClusterError(missing_output_message(store.uri, stage, models))
        jobs, created = apply_stage(cluster, manifests, stage, models, log)
        applied += created
        if not wait:
            states = {j.name: job_state(cluster.get_job(j.namespace, j.name)) for j in jobs}
            state = "queued" if any(s.state == "queued" for s in states.values()) else "submitted"
            return SubmitResult(exp.name, manifests.namespace, state, stage, applied,
                                [job_row(j, states[j.name]) for j in jobs])
        wait_for_jobs(
            cluster, jobs, log, poll_s=poll_s, timeout_s=timeout_s,
            progress=(lambda s=stage, ms=models: _progress(ctx, s, ms)) if stage != "reduce" else None,
            logs_hint=lambda j: f". Logs: {logs_command} --stage {j.stage}"
            + (f" --model {j.model}" if j.model else ""),
        )
        done_stages.add(stage)
        stage, models = unfinished(ctx)


# ------------------------------------------------------------------------------------------------ status, cancel, logs


def job_row(job: StageJob, st: JobState) -> dict[str, Any]:
    return {"stage": job.stage, "model": job.model, "job": job.name, "namespace": job.namespace,
            "state": st.state, "active": st.active, "succeeded": st.succeeded, "failed": st.failed,
            "completions": st.completions, "reason": st.reason, "message": st.message}


def job_status(exp: Experiment, cluster: Cluster, manifests: Manifests | None = None) -> list[dict[str, Any]]:
    """One row per Job the experiment renders to: stage, model, job, namespace, state (see JobState),
    pod counts, and the reason and message of a failure."""
    manifests = manifests or render_experiment(exp)
    return [job_row(j, job_state(cluster.get_job(j.namespace, j.name))) for j in manifests.jobs]


def cancel(exp: Experiment, cluster: Cluster) -> list[str]:
    """Delete every Job of the experiment (found by its label, so Jobs of earlier versions of the spec too);
    the pods go with them (propagation: background). The store and the ConfigMap are kept. Returns the names
    of the deleted Jobs."""
    return delete_jobs(cluster, exp.spec.kubernetes.namespace, exp.name)


def delete_jobs(cluster: Cluster, namespace: str, experiment: str) -> list[str]:
    """``cancel`` by name: also for an experiment whose spec no longer parses (the operator, on deletion)."""
    deleted = []
    for job in cluster.list_jobs(namespace, {LABEL_EXPERIMENT: experiment}):
        name = job["metadata"]["name"]
        if cluster.delete_job(namespace, name):
            deleted.append(name)
    return sorted(deleted)


def _pod_sort_key(pod: dict[str, Any]) -> tuple[int, str, str]:
    meta = pod.get("metadata") or {}
    index = (meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION, "")
    return (int(index) if str(index).isdigit() else -1, str(meta.get("creationTimestamp") or ""),
            str(meta.get("name")))


def stream_logs(
    exp: Experiment,
    cluster: Cluster,
    stage: str,
    model: str | None,
    write: Callable[[str], None],
    *,
    follow: bool = False,
) -> int:
    """Write the logs of the pods of ``stage`` (for ``model``, or every model) line by line; with several pods
    each line is prefixed by ``[pod]``. With ``follow``, the pods are followed concurrently until they end.
    Returns the number of pods. Raises ClusterError when there is no pod to show."""
    if model is not None:
        exp.model(model)  # KeyError names the known models
    manifests = render_experiment(exp)
    jobs = manifests.stage_jobs(stage, None if model is None or stage == "reduce" else [model])
    if not jobs:
        raise ClusterError(f"the experiment has no {stage} Job" + (f" for model {model}" if model else ""))
    pods: list[tuple[StageJob, dict[str, Any]]] = []
    for j in jobs:
        found = sorted(cluster.list_pods(j.namespace, {JOB_NAME_LABEL: j.name}), key=_pod_sort_key)
        pods += [(j, p) for p in found]
    if not pods:
        states = ", ".join(f"{j.name}: {job_state(cluster.get_job(j.namespace, j.name)).describe()}" for j in jobs)
        raise ClusterError(f"no pods yet for {states}")
    prefix = len(pods) > 1
    if not follow:
        for j, p in pods:
            name = p["metadata"]["name"]
            for line in cluster.pod_log_lines(j.namespace, name, j.stage, follow=False):
                write(f"[{name}] {line}" if prefix else line)
        return len(pods)
    # Follow every pod at once: one reader thread per pod, lines written from this thread in arrival order.
    lines: queue.Queue[tuple[str, str | None, BaseException | None]] = queue.Queue()

    def reader(j: StageJob, name: str) -> None:
        try:
            for line in cluster.pod_log_lines(j.namespace, name, j.stage, follow=True):
                lines.put((name, line, None))
            lines.put((name, None, None))
        except BaseException as e:  # handed to the writing thread, which raises it
            lines.put((name, None, e))

    for j, p in pods:
        threading.Thread(target=reader, args=(j, p["metadata"]["name"]), daemon=True).start()
    open_streams = len(pods)
    while open_streams:
        name, line, error = lines.get()
        if error is not None:
            raise error
        if line is None:
            open_streams -= 1
            continue
        write(f"[{name}] {line}" if prefix else line)
    return len(pods)
