"""The Experiment operator: with it installed, ``kubectl apply -f experiment.yaml`` runs the experiment.

kopf handlers for ``experiments.alignfake.dev`` (v1alpha1). The operator does what ``alignfake submit --wait``
does, driven by the cluster instead of a terminal, with the same code (``alignfake.executors.kubernetes``):

- On create, resume (operator restart) and update, the object is validated with the CLI's pydantic schema. An
  invalid one gets ``status.phase: Failed`` and a ``Valid=False`` condition naming each field, and no Job. A valid
  one gets the ConfigMap with its spec and the Jobs of the first stage whose output is not committed in the store.
- A daemon per Experiment looks again every ``OperatorConfig.poll_s`` seconds, and at once when one of its Jobs
  finishes (a watch on Jobs labelled with an experiment). When a stage's Jobs succeeded and the store shows the
  stage committed, the next stage's Jobs are applied, up to reduce. Kueue still decides when and where a Job runs.
- ``.status``: ``phase`` (Pending, Queued, Running, Succeeded, Failed), ``message``, the current ``stage``, per
  stage its state, committed pieces and Jobs, ``conditions`` (Valid, Complete, Failed), ``observedGeneration`` and
  ``results`` (where the reduce stage writes).
- Deleting the Experiment deletes its Jobs (propagation: background) and keeps the store. The ConfigMap and the
  Jobs name the Experiment as their owner, so the garbage collector removes them too without the operator.

A spec change (new ``metadata.generation``) is handled like ``alignfake submit`` of the new spec: committed output
from other inputs fails the experiment with the message and nothing is deleted; a stage whose Jobs still run from
the previous spec waits for them to finish. A failed experiment stays failed for its generation: change its spec,
or set the annotation ``alignfake.dev/retry`` to a new value (``kubectl annotate experiment NAME
alignfake.dev/retry=2 --overwrite``) to try again, as a second ``submit`` would.

Run it with ``alignfake operator`` or ``kopf run -m alignfake.operator --all-namespaces``. This module imports
kopf; ``alignfake.cli`` never imports it.
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import kopf

from .errors import DataError, SpecError, StaleOutputError, StoreError
from .executors import kubernetes as kx
from .k8s.crd import GROUP, PLURAL, VERSION
from .k8s.render import LABEL_EXPERIMENT, STAGES, Manifests, StageJob, render_experiment
from .spec import API_VERSION, KIND, Experiment, parse_experiment

RETRY_ANNOTATION = f"{GROUP}/retry"
"""Setting it to a new value runs a failed (or finished) experiment again, like a second ``alignfake submit``."""
FINALIZER = f"{GROUP}/delete-jobs"
POLL_ENV = "ALIGNFAKE_OPERATOR_POLL_SECONDS"

Log = Callable[[str], None]


@dataclass(frozen=True)
class OperatorConfig:
    """How the operator runs: runtime settings, apart from the experiments' own specs."""

    poll_s: float = 30.0
    """Seconds between two looks at an unfinished experiment (Jobs and store). A finished Job is noticed at once;
    the poll catches the rest (a Job admitted by Kueue, a pod that starts)."""
    namespaces: tuple[str, ...] = ()
    """Namespaces whose Experiments are served; empty: every namespace."""
    kubeconfig: str | None = None
    """kubeconfig file; default: ``$KUBECONFIG``, ``~/.kube/config``, else the pod's service account."""
    context: str | None = None
    """kubeconfig context; default: the current one."""
    liveness: str | None = None
    """URL where kopf serves its liveness probe, e.g. ``http://0.0.0.0:8080/healthz``."""

    @classmethod
    def from_env(cls) -> OperatorConfig:
        """The settings of ``kopf run -m alignfake.operator``: ``$ALIGNFAKE_OPERATOR_POLL_SECONDS``, and the
        cluster as kubectl finds it."""
        raw = os.environ.get(POLL_ENV)
        if not raw:
            return cls()
        try:
            poll_s = float(raw)
        except ValueError:
            poll_s = -1.0
        if not poll_s > 0:
            raise ValueError(f"${POLL_ENV} must be a positive number of seconds, not {raw!r}")
        return cls(poll_s=poll_s)


# ---------------------------------------------------------------------------------------------- the object


def experiment_from_body(body: Mapping[str, Any]) -> Experiment:
    """The Experiment a custom resource describes. Only the name is taken from its metadata (labels,
    annotations, uid ... are the cluster's and kopf's, not the experiment's, and would change the ConfigMap's spec
    at every write). The Jobs go into the resource's own namespace, the only one an owner reference can span:
    ``spec.kubernetes.namespace`` may be left out, or must name it."""
    meta = body.get("metadata") or {}
    namespace = meta.get("namespace") or "default"
    spec = copy.deepcopy(body.get("spec"))
    problems = []
    if isinstance(spec, dict):
        kube = spec.setdefault("kubernetes", {})
        if isinstance(kube, dict):
            if kube.get("namespace", namespace) != namespace:
                problems.append(f"spec.kubernetes.namespace: must be left out or be {namespace!r}, the namespace of "
                                "the Experiment, which owns its Jobs")
            kube["namespace"] = namespace
    data = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": {"name": meta.get("name")},
            "spec": spec}
    source = source_of(body)
    try:
        exp = parse_experiment(data, source)
    except SpecError as e:
        raise SpecError(source, problems + e.problems) from None
    if problems:
        raise SpecError(source, problems)
    return exp


def source_of(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{KIND} {meta.get('namespace')}/{meta.get('name')}"


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    """The Experiment as controller of its ConfigMap and Jobs: deleting it cascades to them."""
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def owned(manifests: Manifests, owner: dict[str, Any]) -> Manifests:
    """``manifests`` with ``owner`` in every object's ``metadata.ownerReferences``."""

    def own(obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj["metadata"]["ownerReferences"] = [dict(owner)]
        return obj

    return Manifests(experiment=manifests.experiment, namespace=manifests.namespace,
                     configmap=own(manifests.configmap),
                     jobs=tuple(StageJob(j.stage, j.model, own(j.manifest)) for j in manifests.jobs))


def attempt_of(body: Mapping[str, Any]) -> str:
    """One run of an experiment: its generation, plus the retry annotation's value."""
    meta = body.get("metadata") or {}
    retry = (meta.get("annotations") or {}).get(RETRY_ANNOTATION, "")
    return f"{meta.get('generation') or 1}" + (f"/{retry}" if retry else "")


# ---------------------------------------------------------------------------------------------- reconciling


@dataclass
class Outcome:
    """Where one look at an experiment left it."""

    phase: str
    message: str
    reason: str = ""
    """Why it failed: Invalid, InvalidData, StaleOutput, JobFailed or OutputMissing."""
    stage: str | None = None
    stages: dict[str, Any] | None = None
    results: str | None = None
    retrying: bool = False
    """The API server or the store could not be reached: only the message is new, the rest of the status stays."""


@dataclass
class Tracker:
    """What the operator did for one Experiment, in kopf's per-object memo. Handlers and the daemon take turns
    (``lock``); after an operator restart the tracker starts from the object's status."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    attempt: str | None = None
    stage: str | None = None
    """The stage whose Jobs were applied in this attempt (entering a stage replaces its finished Jobs from earlier
    attempts, as submit does; afterwards a failed Job fails the experiment)."""
    started: bool = False
    """The ConfigMap is applied and spec.yaml written to the store for this attempt."""
    done: bool = False
    """Succeeded or failed: nothing more to do until the next attempt."""
    final: Outcome | None = None
    """How the attempt ended, once ``done``."""
    phase: str = "Pending"
    ctx: Any = None
    """The ``stages.common.Context`` of this attempt (it caches the inputs' fingerprints)."""
    deleted: bool = False
    status: dict[str, Any] | None = None
    """The status last written."""

    def begin(self, attempt: str, status: Mapping[str, Any]) -> None:
        same = status.get("attempt") == attempt
        self.attempt, self.started, self.ctx = attempt, False, None
        self.stage = status.get("stage") if same else None
        self.done = same and status.get("phase") in ("Succeeded", "Failed")
        self.phase = str(status.get("phase") or "Pending") if same else "Pending"
        failed = {c.get("type"): c for c in status.get("conditions") or []}.get("Failed") or {}
        self.final = Outcome(self.phase, str(status.get("message") or ""), reason=str(failed.get("reason") or "")
                             if failed.get("status") == "True" else "") if self.done else None


def reconcile(body: Mapping[str, Any], cluster: kx.Cluster, tracker: Tracker, log: Log,
              poll_s: float) -> Outcome | None:
    """Look at one Experiment and do the next thing it needs; None when there is nothing to do (its attempt
    finished). Unreachable API or store: the outcome keeps the phase and says so; the next look retries."""
    attempt = attempt_of(body)
    if tracker.attempt != attempt:
        tracker.begin(attempt, body.get("status") or {})
    if tracker.done:
        return None
    try:
        exp = experiment_from_body(body)
        manifests = owned(render_experiment(exp, source_of(body)), owner_reference(body))
    except SpecError as e:
        return _finish(tracker, Outcome("Failed", "; ".join(e.problems), reason="Invalid"))
    try:
        return _advance(exp, manifests, cluster, tracker, log)
    except DataError as e:
        return _finish(tracker, Outcome("Failed", str(e), reason="InvalidData"))
    except StaleOutputError as e:
        return _finish(tracker, Outcome("Failed", f"{e} {_AGAIN}", reason="StaleOutput"))
    except (kx.ClusterError, StoreError) as e:
        return Outcome(tracker.phase, f"{e} (trying again within {poll_s:g}s)", retrying=True)


_AGAIN = (f"Then set the annotation {RETRY_ANNOTATION} to a new value (or change the spec) to run the experiment "
          "again.")


def _finish(tracker: Tracker, outcome: Outcome) -> Outcome:
    tracker.done, tracker.final = True, outcome
    return outcome


def _advance(exp: Experiment, manifests: Manifests, cluster: kx.Cluster, tracker: Tracker, log: Log) -> Outcome:
    from .executors.local import experiment_status
    from .stages.common import RESULTS_KEY, Context
    from .store import store_for

    if tracker.ctx is None:
        store = store_for(exp)
        problem = kx.local_store_problem(exp, store)
        if problem:
            return _finish(tracker, Outcome("Failed", problem, reason="Invalid"))
        store.check()
        tracker.ctx = Context(exp, store)
    ctx = tracker.ctx
    results = f"{ctx.store.uri}/{RESULTS_KEY}"
    rows = experiment_status(ctx)
    stage, models = kx.first_unfinished(rows, ctx.store.uri)
    if not tracker.started:
        cluster.apply(manifests.configmap)
        ctx.store.write_text("spec.yaml", exp.to_yaml())
        tracker.started = True
    while True:
        if stage is None:
            return _finish(tracker, Outcome("Succeeded", f"every stage is committed; results in {results}",
                                            stages=_stages(rows, None, [], {}), results=results))
        if tracker.stage != stage:
            jobs, _ = kx.apply_stage(cluster, manifests, stage, models, log)
            tracker.stage = stage
        else:
            jobs = manifests.stage_jobs(stage, models)
            for j in jobs:
                if cluster.get_job(j.namespace, j.name) is None:  # deleted by hand, or by its TTL
                    log(f"{j.label}: Job {j.name} is gone; applying it again")
                    cluster.apply(j.manifest)
        states = {j.name: kx.job_state(cluster.get_job(j.namespace, j.name)) for j in jobs}
        failed = [j for j in jobs if states[j.name].state == "failed"]
        if failed:
            j = failed[0]
            message = (kx.job_failure_message(j, states[j.name])
                       + f". Logs: kubectl logs -n {j.namespace} -l batch.kubernetes.io/job-name={j.name}. {_AGAIN}")
            return _finish(tracker, Outcome("Failed", message, reason="JobFailed", stage=stage,
                                            stages=_stages(rows, stage, jobs, states), results=results))
        if all(st.state == "succeeded" for st in states.values()):
            rows = experiment_status(ctx)
            following, models = kx.first_unfinished(rows, ctx.store.uri)
            if following == stage:
                message = f"{kx.missing_output_message(ctx.store.uri, stage, models)} {_AGAIN}"
                return _finish(tracker, Outcome("Failed", message, reason="OutputMissing", stage=stage,
                                                stages=_stages(rows, stage, jobs, states), results=results))
            stage = following
            continue
        phase = _phase(states.values())
        message = f"stage {stage}: " + "; ".join(f"{j.label} {states[j.name].describe()}" for j in jobs)
        return Outcome(phase, message, stage=stage, stages=_stages(rows, stage, jobs, states), results=results)


def _phase(states: Any) -> str:
    kinds = {st.state for st in states}
    if kinds & {"queued", "suspended"}:
        return "Queued"
    if kinds <= {"pending"}:
        return "Pending"
    return "Running"


def _stages(rows: list[Any], current: str | None, jobs: list[StageJob],
            states: dict[str, kx.JobState]) -> dict[str, Any]:
    """Per stage: state (pending, queued, running, succeeded, failed, stale), committed and total pieces in the
    store, and the current stage's Jobs. Stages the spec does not have are None (removed by the merge patch)."""
    out: dict[str, Any] = {}
    for stage in STAGES:
        mine = [r for r in rows if r.stage == stage]
        if not mine:
            out[stage] = None
            continue
        committed = sum(r.committed for r in mine)
        total = sum(r.committed + r.pending + r.stale for r in mine)
        if any(r.stale for r in mine):
            state = "stale"
        elif committed == total:
            state = "succeeded"
        elif stage == current:
            kinds = {st.state for st in states.values()}
            state = next((k for k in ("failed", "queued", "suspended", "running", "pending") if k in kinds),
                         "running")
        else:
            state = "pending"
        out[stage] = {"state": state, "committed": committed, "total": total,
                      "jobs": [kx.job_row(j, states[j.name]) for j in jobs] if stage == current else []}
    return out


STATUS_KEYS = ("phase", "message", "observedGeneration", "attempt", "stage", "stages", "results", "conditions")
"""The operator's part of ``.status`` (kopf keeps its own bookkeeping beside it, under ``status.kopf``)."""


def status_of(outcome: Outcome, body: Mapping[str, Any], previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``.status`` for ``outcome``. Every key is always written (None removes it in a merge patch), and a
    condition keeps its lastTransitionTime while its status stays the same."""
    if outcome.retrying and previous:
        return {**{k: previous.get(k) for k in STATUS_KEYS}, "message": outcome.message}
    meta = body.get("metadata") or {}
    generation = meta.get("generation") or 1
    invalid = outcome.reason == "Invalid"
    failed = outcome.phase == "Failed"
    succeeded = outcome.phase == "Succeeded"
    wanted = [
        ("Valid", not invalid, "Invalid" if invalid else "Validated", outcome.message if invalid else ""),
        ("Complete", succeeded, outcome.phase, outcome.message if succeeded else ""),
        ("Failed", failed, outcome.reason if failed else outcome.phase, outcome.message if failed else ""),
    ]
    before = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = []
    for kind, true, reason, message in wanted:
        status = "True" if true else "False"
        old = before.get(kind) or {}
        conditions.append({"type": kind, "status": status, "reason": reason, "message": message,
                           "observedGeneration": generation,
                           "lastTransitionTime": old.get("lastTransitionTime") if old.get("status") == status
                           else now})
    return {
        "phase": outcome.phase,
        "message": outcome.message,
        "observedGeneration": generation,
        "attempt": attempt_of(body),
        "stage": outcome.stage,
        "stages": outcome.stages,
        "results": outcome.results,
        "conditions": conditions,
    }


# ---------------------------------------------------------------------------------------------- kopf handlers

_trackers_lock = threading.Lock()


def _tracker(memo: Any) -> Tracker:
    # Handlers run in kopf's threads and the daemon on its loop: the first ones to arrive must share one tracker.
    with _trackers_lock:
        tracker = memo.get("experiment")
        if tracker is None:
            tracker = memo["experiment"] = Tracker()
        return tracker


def _step(namespace: str, name: str, memo: Any, logger: Any) -> Outcome | None:
    """One reconcile of the Experiment, and its status written when it changed. Returns where the experiment is,
    or how its attempt ended (whichever handler or daemon got there first).

    The object is read afresh from the API server, under the lock: a handler's event or the daemon's view may
    lag behind a newer generation, and acting on it would flip the experiment back to an older spec."""
    tracker = _tracker(memo)
    cluster: kx.Cluster = memo.cluster
    with tracker.lock:
        if tracker.deleted:
            return None
        body = cluster.get_custom(API_VERSION, PLURAL, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None  # gone, or being deleted: the delete handler takes over
        outcome = reconcile(body, cluster, tracker, logger.info, memo.config.poll_s)
        if outcome is None:
            return tracker.final
        tracker.phase = outcome.phase
        previous = tracker.status or body.get("status") or {}
        status = status_of(outcome, body, previous)
        if (status["phase"], status["stage"], status["attempt"]) != (previous.get("phase"), previous.get("stage"),
                                                                     previous.get("attempt")):
            # What `kubectl describe experiment` lists: each change of phase or stage, failures as warnings.
            kopf.event(body, type="Warning" if outcome.phase == "Failed" else "Normal",
                       reason=outcome.reason or outcome.phase, message=outcome.message)
        if status != tracker.status:
            try:
                cluster.patch_status(API_VERSION, PLURAL, namespace, name, status)
                tracker.status = status
            except kx.ClusterError as e:  # written at the next look
                logger.warning(str(e))
        return outcome


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Runtime settings: ``memo.config`` from ``alignfake operator``, else from the environment."""
    config = memo.get("config") or OperatorConfig.from_env()
    memo.config = config
    memo.cluster = kx.connect(context=config.context, kubeconfig=config.kubeconfig)
    memo.wakers = {}  # Experiment uid -> its daemon's asyncio.Event; shared by every object's memo
    # Least privilege: no cluster-wide watch of CRDs and namespaces (the CRD is installed with the operator) and no
    # peering objects (one replica, Deployment strategy Recreate).
    settings.scanning.disabled = True
    settings.peering.standalone = True
    settings.persistence.finalizer = FINALIZER


@kopf.on.login()
def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    """kopf reaches the cluster the way ``alignfake`` does (``connect``: kubeconfig and context, else the service
    account), so that both talk to the same API server."""
    config = memo.get("config") or OperatorConfig.from_env()
    cfg = kx.connect(context=config.context, kubeconfig=config.kubeconfig).api_client.configuration
    # As kopf's own login_via_client: the bearer token moved between client versions.
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl, username=cfg.username or None,
        password=cfg.password or None, scheme=scheme, token=token, certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file, trust_env=settings.networking.trust_env,
    )


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def experiment_changed(namespace: str, name: str, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Validate, then apply the first unfinished stage (or take the spec change into account)."""
    outcome = _step(namespace, name, memo, logger)
    if outcome is not None and outcome.reason == "Invalid":
        raise kopf.PermanentError(outcome.message)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10)
async def experiment_daemon(namespace: str, name: str, uid: str, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                            logger: Any, **_: Any) -> None:
    """Advance the experiment stage by stage: every poll, and at once when one of its Jobs finishes."""
    wake = asyncio.Event()
    memo.wakers[uid] = wake
    try:
        while not stopped:
            try:
                await asyncio.to_thread(_step, namespace, name, memo, logger)
            except Exception:  # noqa: BLE001 - one failed look must not end the watch; the next one retries
                logger.exception("reconciling the experiment failed")
            try:
                await asyncio.wait_for(wake.wait(), timeout=memo.config.poll_s)
            except asyncio.TimeoutError:
                pass
            wake.clear()
    finally:
        memo.wakers.pop(uid, None)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_EXPERIMENT: kopf.PRESENT})
async def job_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Wake the daemon of the Experiment that owns a Job that finished or disappeared."""
    if type != "DELETED" and not kx.job_state(body).finished:
        return
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("apiVersion") == API_VERSION and ref.get("kind") == KIND:
            wake = memo.wakers.get(ref.get("uid"))
            if wake is not None:
                wake.set()


@kopf.on.delete(GROUP, VERSION, PLURAL)
def experiment_deleted(name: str, namespace: str, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Delete the Experiment's Jobs (propagation: background); the store keeps every committed output."""
    tracker = _tracker(memo)
    with tracker.lock:  # a look in progress finishes first; none follows
        tracker.deleted = True
        try:
            deleted = kx.delete_jobs(memo.cluster, namespace, name)
        except kx.ClusterError as e:
            raise kopf.TemporaryError(str(e), delay=memo.config.poll_s) from None
    logger.info("deleted Jobs: " + (", ".join(deleted) if deleted else "none") + "; the store is kept")
