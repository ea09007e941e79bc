"""Render an experiment as Kubernetes objects: a ConfigMap holding the spec, then per stage and model a Job.

Manifests are data, not text. The fixed part of each object is a YAML file in ``templates/`` (package data)
loaded with ``yaml.safe_load``; everything that comes from the experiment is set as a value in the loaded tree
and serialized by the YAML emitter. No string from a spec is ever pasted into YAML text, so newlines, quotes,
``{{``, anchors or ``hostNetwork: true`` in a field stay a string. Output is deterministic: keys are sorted,
lists are built in a fixed order, nothing depends on time or on the machine.

Stages and their Jobs:

- ``finetune`` (models with a ``finetune`` section): trainer image, ``models[].finetune.gpus`` GPUs, a
  memory-backed ``/dev/shm``. ``alignfake stage finetune`` launches Axolotl (or peft) inside the pod.
- ``sample``: an Indexed Job of ``kubernetes.sample_shards`` pods; each reads ``JOB_COMPLETION_INDEX`` and
  takes every N-th completion shard. Image by provider: vllm -> vllm image (tensor parallel over the pod's
  GPUs, ``models[].inference.gpus``); transformers -> trainer image (it has torch, transformers, peft);
  openai, anthropic, mock -> core image, no GPU.
- ``classify``: core image (vllm or trainer image when an ``llm`` judge uses that provider).
- ``reduce``: once, core image.

This module imports neither the kubernetes client nor torch; it never talks to a cluster.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..errors import SpecError
from ..spec import Experiment, ModelSpec, StageResources
from .naming import configmap_name, job_name

STAGES: tuple[str, ...] = ("finetune", "sample", "classify", "reduce")
SYNC_WAVES = {"spec": 0, "finetune": 1, "sample": 2, "classify": 3, "reduce": 4}
"""Argo CD applies waves in order and waits for the objects of a wave to be healthy (a Job: complete)."""

SPEC_DIR = "/etc/alignfake"
SPEC_FILE = "experiment.yaml"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_FILE}"
SCRATCH_DIR = "/scratch"
DATA_DIR = "/data"
HF_CACHE_DIR = "/hf-cache"

LABEL_EXPERIMENT = "alignfake.dev/experiment"
LABEL_STAGE = "alignfake.dev/stage"
LABEL_MODEL = "alignfake.dev/model"
ANNOTATION_SPEC_HASH = "alignfake.dev/spec-sha256"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
ANNOTATION_SYNC_WAVE = "argocd.argoproj.io/sync-wave"
GPU_RESOURCE = "nvidia.com/gpu"

CORE_UID = 10001
"""The unprivileged user of images/core/Dockerfile."""

DEFAULT_CPU = {"finetune": "4", "sample": "2", "classify": "2", "reduce": "1"}
DEFAULT_MEMORY = {"finetune": "16Gi", "sample": "8Gi", "classify": "8Gi", "reduce": "4Gi"}
CPU_PER_GPU = 8
MEMORY_PER_GPU_GI = 64
DEFAULT_SHM_WITH_GPUS = "16Gi"
DEFAULT_DEADLINE_S = {"finetune": 3 * 86400, "sample": 86400, "classify": 86400, "reduce": 3600}

DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}


@dataclass(frozen=True)
class Runtime:
    """What a stage's pod runs on: which image of ``spec.kubernetes.images`` and how it may be locked down."""

    image: str
    """Key of ``spec.kubernetes.images``: trainer, vllm or core."""
    non_root: bool
    """The image runs as an unprivileged user (core). The Axolotl and vLLM base images keep their Python
    environments under root's home and are documented to run as root, so their pods run as root, still without
    privilege escalation and with every capability dropped."""
    read_only_root: bool
    """Nothing writes outside the mounted volumes (HOME, TMPDIR and caches point at /scratch)."""


RUNTIMES = {
    "core": Runtime("core", non_root=True, read_only_root=True),
    "trainer": Runtime("trainer", non_root=False, read_only_root=False),
    "vllm": Runtime("vllm", non_root=False, read_only_root=False),
}


@dataclass(frozen=True)
class StageJob:
    """One rendered Job: the stage and model it runs, and its manifest."""

    stage: str
    model: str | None
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return self.manifest["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.manifest["metadata"]["namespace"]

    @property
    def spec_hash(self) -> str:
        return self.manifest["metadata"]["annotations"][ANNOTATION_SPEC_HASH]

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.model}" if self.model else self.stage


@dataclass(frozen=True)
class Manifests:
    """Everything ``render_experiment`` produces for one experiment."""

    experiment: str
    namespace: str
    configmap: dict[str, Any]
    jobs: tuple[StageJob, ...]

    def stage_jobs(self, stage: str, models: Iterable[str | None] | None = None) -> list[StageJob]:
        """The Jobs of ``stage`` (only those of ``models`` if given), in model order."""
        wanted = None if models is None else set(models)
        return [j for j in self.jobs if j.stage == stage and (wanted is None or j.model in wanted)]

    def objects(self) -> list[dict[str, Any]]:
        """The ConfigMap, then the Jobs in stage order: the order to apply them in."""
        return [self.configmap, *(j.manifest for j in self.jobs)]

    def stream(self) -> str:
        """All objects as one multi-document YAML stream (for ``kubectl apply -f -``)."""
        return "".join(f"---\n{dump_yaml(o)}" for o in self.objects())

    def files(self) -> dict[str, str]:
        """File name -> content: one file per object, prefixed by its sync wave so that a plain directory
        listing is the apply order, plus ``kustomization.yaml`` listing them."""
        files: dict[str, str] = {}
        for obj in self.objects():
            files[file_name(obj)] = _header(self.experiment) + dump_yaml(obj)
        kustomization = _template("kustomization.yaml")
        kustomization["resources"] = list(files)
        files["kustomization.yaml"] = _header(self.experiment, KUSTOMIZE_NOTE) + dump_yaml(kustomization)
        return files


HEADER_MARK = "# Rendered by `alignfake render`"
KUSTOMIZE_NOTE = (
    "`kubectl apply -k` creates every stage at once, and later stages fail until earlier ones are done: apply\n"
    "stage by stage with `alignfake submit`, or with a GitOps tool that honours the argocd.argoproj.io/sync-wave\n"
    "annotations (Argo CD waits for each wave's Jobs to complete before the next)."
)


def _header(experiment: str, note: str = "") -> str:
    # experiment is a validated DNS label: safe in a comment line
    lines = [f"{HEADER_MARK} from experiment {experiment}; re-render instead of editing."]
    lines += [f"# {line}" for line in note.splitlines()]
    return "\n".join(lines) + "\n"


def file_name(obj: dict[str, Any]) -> str:
    wave = obj["metadata"]["annotations"][ANNOTATION_SYNC_WAVE]
    return f"{int(wave):02d}-{obj['metadata']['name']}.yaml"


# ---------------------------------------------------------------------------------------------- YAML output


class _Dumper(yaml.SafeDumper):
    """Safe dumper; lists indented under their key (as kubectl prints them), multi-line strings as blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # The emitter falls back to a quoted scalar when a block cannot hold the string exactly.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(obj: Any) -> str:
    """Serialize one object: sorted keys, block style, no line wrapping, UTF-8 as is."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=True, default_flow_style=False, allow_unicode=True,
                     width=1 << 20)


@cache
def _parsed_template(name: str) -> dict[str, Any]:
    return yaml.safe_load(resources.files("alignfake.k8s").joinpath("templates", name).read_text(encoding="utf-8"))


def _template(name: str) -> dict[str, Any]:
    """A fresh copy of a template, to fill in."""
    return copy.deepcopy(_parsed_template(name))


# ---------------------------------------------------------------------------------------------- rendering


def render_experiment(exp: Experiment, source: str = "<spec>") -> Manifests:
    """The Kubernetes objects of ``exp``. Raises SpecError (naming ``source`` and the field) when the
    experiment cannot run as Jobs, e.g. an API key the pods could not read."""
    _check(exp, source)
    k = exp.spec.kubernetes
    spec_text = exp.to_yaml()
    spec_hash = hashlib.sha256(spec_text.encode("utf-8")).hexdigest()[:16]

    cm = _template("configmap.yaml")
    cm["metadata"] = _metadata(exp, configmap_name(exp.name), component="spec", wave=SYNC_WAVES["spec"])
    cm["data"] = {SPEC_FILE: spec_text}

    jobs: list[StageJob] = []
    for m in exp.spec.models:
        if m.finetune is not None:
            jobs.append(_stage_job(exp, "finetune", m, spec_hash))
    for m in exp.spec.models:
        jobs.append(_stage_job(exp, "sample", m, spec_hash))
    for m in exp.spec.models:
        jobs.append(_stage_job(exp, "classify", m, spec_hash))
    jobs.append(_stage_job(exp, "reduce", None, spec_hash))
    return Manifests(experiment=exp.name, namespace=k.namespace, configmap=cm, jobs=tuple(jobs))


def write_files(manifests: Manifests, out_dir: str | Path) -> list[Path]:
    """Write ``manifests.files()`` into ``out_dir``. Files of an earlier render (recognised by their header)
    that this render no longer produces are removed, so that the directory is exactly the experiment; other
    files are left alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = manifests.files()
    for old in sorted(out.glob("*.yaml")):
        if old.name not in files and _rendered_by_us(old):
            old.unlink()
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def _rendered_by_us(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            return f.readline().startswith(HEADER_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def runtime_for(exp: Experiment, stage: str, model: ModelSpec | None) -> Runtime:
    """The image (and its security profile) a stage's pod runs."""
    if stage == "finetune":
        return RUNTIMES["trainer"]
    if stage == "sample":
        assert model is not None
        return RUNTIMES[{"vllm": "vllm", "transformers": "trainer"}.get(model.provider, "core")]
    if stage == "classify":
        judges = exp.spec.judges
        providers = {j.provider for j in (judges.compliance, judges.partial_compliance, judges.af_reasoning)
                     if j.kind == "llm"}
        if "vllm" in providers:
            return RUNTIMES["vllm"]
        if "transformers" in providers:
            return RUNTIMES["trainer"]
    return RUNTIMES["core"]


def gpus_for(stage: str, model: ModelSpec | None, res: StageResources) -> int:
    if res.gpus is not None:
        return res.gpus
    if stage == "finetune" and model is not None and model.finetune is not None:
        return model.finetune.gpus
    if stage == "sample" and model is not None and model.provider in ("vllm", "transformers"):
        return model.inference.gpus
    return 0


def sample_completions(exp: Experiment) -> int:
    """Pods of a sampling Job: ``sample_shards``, but never more than there can be completion shards (known
    without reading the queries when ``evaluation.queries.limit`` is set), so that no pod idles."""
    n = exp.spec.kubernetes.sample_shards
    ev = exp.spec.evaluation
    if ev.queries.limit is not None:
        n = min(n, math.ceil(ev.queries.limit / ev.shard_size))
    return max(n, 1)


def _labels(exp: Experiment, component: str, model: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "alignfake",
        "app.kubernetes.io/instance": exp.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "alignfake",
        "app.kubernetes.io/managed-by": "alignfake",
        LABEL_EXPERIMENT: exp.name,
    }
    if component in STAGES:
        labels[LABEL_STAGE] = component
    if model:
        labels[LABEL_MODEL] = model
    return labels


def _metadata(exp: Experiment, name: str, component: str, wave: int, model: str | None = None,
              extra_annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": exp.spec.kubernetes.namespace,
        "labels": _labels(exp, component, model),
        "annotations": {ANNOTATION_SYNC_WAVE: str(wave), **(extra_annotations or {})},
    }


def _literal(value: str) -> str:
    """Kubernetes expands ``$(VAR)`` in env values, commands and args; ``$$`` is a literal ``$``. A user value
    must reach the pod exactly as written."""
    return value.replace("$", "$$")


def _env(exp: Experiment) -> list[dict[str, Any]]:
    # Credentials only by reference: the values stay in the cluster's Secrets.
    secrets = exp.spec.kubernetes.secrets
    env: list[dict[str, Any]] = [{"name": n, "value": v} for n, v in _fixed_env(exp).items()]
    for name in sorted(secrets):
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secrets[name].name,
                                                                 "key": secrets[name].key}}})
    return env


def _fixed_env(exp: Experiment) -> dict[str, str]:
    """Environment alignfake sets itself (in this order); a secret may not shadow one of these."""
    k, storage = exp.spec.kubernetes, exp.spec.storage
    env = {
        "PYTHONUNBUFFERED": "1",  # log lines reach `kubectl logs` as they are written
        "HOME": SCRATCH_DIR,
        "TMPDIR": SCRATCH_DIR,
        "XDG_CACHE_HOME": f"{SCRATCH_DIR}/cache",
        "MPLCONFIGDIR": f"{SCRATCH_DIR}/matplotlib",
        "HF_HOME": HF_CACHE_DIR if k.hf_cache_claim else f"{SCRATCH_DIR}/huggingface",
    }
    if storage.endpoint_url:
        env["AWS_ENDPOINT_URL"] = _literal(storage.endpoint_url)
    if storage.region:
        env["AWS_REGION"] = _literal(storage.region)
        env["AWS_DEFAULT_REGION"] = _literal(storage.region)
    return env


def _args(stage: str, model: str | None, completions: int) -> list[str]:
    args = ["stage", stage, SPEC_PATH]
    if model is not None:
        args += ["--model", model]
    if stage == "sample":
        args += ["--shard-count", str(completions)]
    return args


def _resources(stage: str, gpus: int, res: StageResources) -> dict[str, Any]:
    cpu = res.cpu or (str(CPU_PER_GPU * gpus) if gpus else DEFAULT_CPU[stage])
    memory = res.memory or (f"{MEMORY_PER_GPU_GI * gpus}Gi" if gpus else DEFAULT_MEMORY[stage])
    # Memory limit = request (a pod is never OOM-killed for using what it asked for); no CPU limit (throttling
    # only slows tokenization and data loading down). Quantities are strings: the API client sends them as is.
    out: dict[str, Any] = {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}
    if gpus:
        out["requests"][GPU_RESOURCE] = out["limits"][GPU_RESOURCE] = str(gpus)
    return out


def _stage_job(exp: Experiment, stage: str, model: ModelSpec | None, spec_hash: str) -> StageJob:
    k = exp.spec.kubernetes
    res = k.stages.get(stage) or StageResources()  # type: ignore[call-overload]
    runtime = runtime_for(exp, stage, model)
    gpus = gpus_for(stage, model, res)
    indexed = stage == "sample"
    completions = sample_completions(exp) if indexed else 1
    model_name = model.name if model else None

    job = _template("job.yaml")
    job["metadata"] = _metadata(
        exp, job_name(exp.name, stage, model_name, indexed=indexed), component=stage, wave=SYNC_WAVES[stage],
        model=model_name, extra_annotations={ANNOTATION_SPEC_HASH: spec_hash},
    )
    if k.queue:
        job["metadata"]["labels"][LABEL_KUEUE_QUEUE] = k.queue

    spec = job["spec"]
    spec["completions"] = completions
    spec["parallelism"] = completions
    if indexed:
        spec["completionMode"] = "Indexed"
        spec["backoffLimitPerIndex"] = res.backoff_limit
    else:
        spec["backoffLimit"] = res.backoff_limit
    spec["activeDeadlineSeconds"] = res.active_deadline_seconds or DEFAULT_DEADLINE_S[stage]
    spec["ttlSecondsAfterFinished"] = k.ttl_seconds_after_finished
    # Kueue admits a suspended Job when its queue has quota; without a queue the Job starts at once.
    spec["suspend"] = bool(k.queue)
    for rule in spec["podFailurePolicy"]["rules"]:
        if "onExitCodes" in rule:
            rule["onExitCodes"]["containerName"] = stage

    template = spec["template"]
    template["metadata"] = {"labels": _labels(exp, stage, model_name)}
    pod = template["spec"]
    container = pod["containers"][0]
    container["name"] = stage
    container["image"] = getattr(k.images, runtime.image)
    container["args"] = _args(stage, model_name, completions)
    container["env"] = _env(exp)
    container["resources"] = _resources(stage, gpus, res)
    container["workingDir"] = DATA_DIR if k.volume_claim else SCRATCH_DIR
    container["securityContext"]["readOnlyRootFilesystem"] = runtime.read_only_root
    if runtime.non_root:
        container["securityContext"]["runAsNonRoot"] = True
        pod["securityContext"].update(
            {"runAsNonRoot": True, "runAsUser": CORE_UID, "runAsGroup": CORE_UID, "fsGroup": CORE_UID}
        )

    mounts: list[dict[str, Any]] = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "spec", "configMap": {"name": configmap_name(exp.name),
                                       "items": [{"key": SPEC_FILE, "path": SPEC_FILE}]}},
        {"name": "scratch", "emptyDir": {}},
    ]
    shm = res.shm_size or (DEFAULT_SHM_WITH_GPUS if gpus else None)
    if shm:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}})
    if k.volume_claim:
        mounts.append({"name": "data", "mountPath": DATA_DIR})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": k.volume_claim}})
    if k.hf_cache_claim:
        mounts.append({"name": "hf-cache", "mountPath": HF_CACHE_DIR})
        volumes.append({"name": "hf-cache", "persistentVolumeClaim": {"claimName": k.hf_cache_claim}})
    container["volumeMounts"] = mounts
    pod["volumes"] = volumes

    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if k.priority_class:
        pod["priorityClassName"] = k.priority_class
    if k.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    if res.node_selector:
        pod["nodeSelector"] = dict(sorted(res.node_selector.items()))
    if res.tolerations:
        pod["tolerations"] = [t.model_dump(exclude_none=True) for t in res.tolerations]
    return StageJob(stage=stage, model=model_name, manifest=job)


# ---------------------------------------------------------------------------------------------- checks


def _check(exp: Experiment, source: str) -> None:
    """What the schema cannot see on its own: settings the pods would fail on."""
    problems: list[str] = []
    k = exp.spec.kubernetes
    fixed = _fixed_env(exp)
    for name in sorted(k.secrets):
        if name in fixed:
            problems.append(f"spec.kubernetes.secrets.{name}: alignfake sets {name} itself; remove this entry")
    for i, m in enumerate(exp.spec.models):
        problems += _key_problem(f"spec.models[{i}].inference", m.provider, m.inference.api_key_env,
                                 m.inference.base_url, k.secrets)
    judges = exp.spec.judges
    for name in ("compliance", "partial_compliance", "af_reasoning"):
        j = getattr(judges, name)
        if j.kind == "llm":
            problems += _key_problem(f"spec.judges.{name}", j.provider, j.api_key_env, j.base_url, k.secrets)
    if problems:
        raise SpecError(source, problems)


def _key_problem(path: str, provider: str, key_env: str | None, base_url: str | None,
                 secrets: dict[str, Any]) -> list[str]:
    """An API provider's pods need their key from a secret. An OpenAI-compatible server of one's own
    (``base_url`` set, no ``api_key_env``) may need none."""
    if provider not in DEFAULT_KEY_ENV:
        return []
    if key_env is None and base_url is not None:
        return []
    env = key_env or DEFAULT_KEY_ENV[provider]
    if env in secrets:
        return []
    return [f"{path}.api_key_env: the {provider} key is read from ${env} in the pods, but spec.kubernetes.secrets "
            f"has no {env} entry (add {env}: {{name: SECRET, key: KEY}})"]
