"""The Argo WorkflowTemplate (``pipelines/argo.py`` -> ``pipelines/deepmedix_workflowtemplate.yaml``).

* The checked-in YAML is a fresh render (``python -m pipelines.argo --out ...``), byte for byte.
* The DAG has the KFP pipeline's tasks and dependencies (compiled now by KFP's compiler from
  ``pipelines.deepmedix_pipeline``), plus the Report Arena and deploy; each step runs the ``deepmedix`` command of
  its stage, with options the CLI really has (read from the Typer app).
* Schema: the object is walked field by field against the models that the ``argo-workflows`` SDK generated from
  Argo's OpenAPI spec (``IoArgoprojWorkflowV1alpha1WorkflowTemplate`` -> ``openapi_types`` / ``attribute_map`` /
  ``allowed_values``; the SDK carries its own copies of the Kubernetes types): an unknown field, a missing required
  one, a leaf of the wrong type or a value outside an enum fails with its path. The same object goes through hera's
  pydantic models of the same spec and must come back unchanged. Containers, volumes and tolerations are walked
  against ``kubernetes.client``'s models too.
* Each step is then resolved as Argo would run it (workflow parameters, task arguments, the ``{{=...}}``
  expressions, ``podSpecPatch``), assembled into a Pod, validated strictly with ``kubernetes-validate``
  (Kubernetes 1.32) and held to Pod Security "restricted".
* GPU steps carry the GPU limit, the GPU pool's node selector and toleration and a memory-backed /dev/shm; CPU
  steps none of these. Credentials only by ``secretKeyRef`` to a Secret by name; nothing credential-shaped.
* The in-pod launcher (``python -m pipelines.argo exec``) turns the JSON overrides into ``--set`` flags and needs no
  hera.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

hera = pytest.importorskip("hera", reason="rendering the WorkflowTemplate needs hera (pip install hera==7.1.0)")
argo_sdk = pytest.importorskip("argo_workflows", reason="the schema check needs argo-workflows==6.7.18")

from argo_workflows import model_utils as amu  # noqa: E402
from argo_workflows.model.io_argoproj_workflow_v1alpha1_workflow_template import (  # noqa: E402
    IoArgoprojWorkflowV1alpha1WorkflowTemplate as ArgoWorkflowTemplate,
)
from hera.workflows.models import WorkflowTemplate as HeraWorkflowTemplate  # noqa: E402
from k8s_checks import assert_restricted, core_validate, image_errors, schema_errors, secret_errors  # noqa: E402

from pipelines import argo  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
YAML_PATH = ROOT / "pipelines" / "deepmedix_workflowtemplate.yaml"
GPU = "nvidia.com/gpu"
TRAINING = {"sft": "sft", "coldstart-sft": "coldstart", "grpo": "grpo"}  # task -> stage name of `stage run`
GPU_TASKS = {"sft", "coldstart-synth", "coldstart-sft", "evaluate-coldstart", "grpo", "evaluate"}
CPU_TASKS = {"curate", "base-model", "arena", "deploy"}
# the deepmedix command each task runs (the words before its options)
COMMANDS = {"curate": ["curate"], "base-model": ["model", "tiny"], "sft": ["stage", "run", "sft"],
            "coldstart-synth": ["coldstart", "synth"], "coldstart-sft": ["stage", "run", "coldstart"],
            "evaluate-coldstart": ["eval", "run"], "grpo": ["stage", "run", "grpo"], "evaluate": ["eval", "run"],
            "arena": ["arena", "run"], "deploy": ["deploy"]}
WORKFLOW_NAME = "deepmedix-r1-x7k2p"
TAG = re.compile(r"\{\{(=?)\s*(.+?)\s*\}\}")


@pytest.fixture(scope="module")
def wt() -> dict:
    return argo.render()


def templates(wt: dict) -> dict[str, dict]:
    return {t["name"]: t for t in wt["spec"]["templates"]}


def dag_tasks(wt: dict) -> dict[str, dict]:
    (main,) = [t for t in wt["spec"]["templates"] if t["name"] == wt["spec"]["entrypoint"]]
    return {task["name"]: task for task in main["dag"]["tasks"]}


def task_template(wt: dict, task: str) -> dict:
    return templates(wt)[dag_tasks(wt)[task]["template"]]


def defaults(wt: dict) -> dict[str, str]:
    return {p["name"]: p["value"] for p in wt["spec"]["arguments"]["parameters"]}


# ------------------------------------------------------------------------------------------------ reproducible

def test_checked_in_yaml_is_a_fresh_render():
    assert YAML_PATH.read_text() == argo.render_yaml(), \
        "pipelines/deepmedix_workflowtemplate.yaml is stale: run python -m pipelines.argo --out " \
        "pipelines/deepmedix_workflowtemplate.yaml"


def test_render_command_writes_the_same_file(tmp_path):
    out = tmp_path / "wt.yaml"
    proc = subprocess.run([sys.executable, "-m", "pipelines.argo", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == YAML_PATH.read_text()
    assert yaml.safe_load(out.read_text()) == argo.render()


def test_identity(wt):
    assert wt["apiVersion"] == "argoproj.io/v1alpha1" and wt["kind"] == "WorkflowTemplate"
    assert wt["metadata"]["name"] == "deepmedix-r1"
    assert "namespace" not in wt["metadata"]  # applied into the pipeline's namespace
    assert wt["spec"]["serviceAccountName"] == "pipeline-runner"


# ------------------------------------------------------------------------------------------------ the DAG vs. KFP

@pytest.fixture(scope="module")
def kfp_dag(tmp_path_factory) -> dict[str, set[str]]:
    """Task -> dependencies of the KFP pipeline, as KFP's compiler writes them now. Tasks under a ``dsl.If`` live in
    a sub-DAG (``condition-N``) whose task holds their dependencies on outer tasks: flattened here."""
    from pipelines.compile import compile_pipeline

    path = compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")
    (spec, *_platform) = [d for d in yaml.safe_load_all(path.read_text()) if d]

    def flatten(tasks: dict, outer: set[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        subs = {}
        for name, t in tasks.items():
            deps = set(t.get("dependentTasks", [])) | outer
            comp = spec["components"][t["componentRef"]["name"]]
            if "dag" in comp:  # a condition / loop group: its tasks inherit its dependencies
                subs[name] = flatten(comp["dag"]["tasks"], deps)
            else:
                out[name] = deps
        groups = {g: set(inner) for g, inner in subs.items()}
        for inner in subs.values():
            out.update(inner)
        # a dependency on a group means one on each of its tasks
        return {n: set().union(*(groups.get(d, {d}) for d in deps)) if deps else set() for n, deps in out.items()}

    return flatten(spec["root"]["dag"]["tasks"], set())


def test_same_stages_and_dependencies_as_the_kfp_pipeline(wt, kfp_dag):
    from pipelines.deepmedix_pipeline import STAGE_TASKS

    # KFP's step-gpus task only works out the training steps' own GPU requests; Argo does that in podSpecPatch
    kfp_dag = {n: d - {"step-gpus"} for n, d in kfp_dag.items() if n != "step-gpus"}

    assert set(STAGE_TASKS) <= set(kfp_dag), f"STAGE_TASKS {STAGE_TASKS} vs. the compiled DAG {sorted(kfp_dag)}"
    tasks = dag_tasks(wt)
    assert set(tasks) == set(kfp_dag) | set(argo.EXTRA_TASKS), \
        f"Argo tasks {sorted(tasks)} vs. KFP's {sorted(kfp_dag)} + {argo.EXTRA_TASKS}"
    argo_deps = {name: set(t.get("dependencies", [])) for name, t in tasks.items()}
    for name, deps in kfp_dag.items():
        assert argo_deps[name] == deps, f"{name}: Argo depends on {sorted(argo_deps[name])}, KFP on {sorted(deps)}"
    if "arena" not in kfp_dag:
        assert argo_deps["arena"] == {"evaluate-coldstart", "evaluate"}
    if "deploy" not in kfp_dag:
        assert argo_deps["deploy"] == {"grpo", "evaluate"}  # only an evaluated model is deployed
    # the order of the stages: a topological order of the Argo DAG respects STAGE_TASKS' order
    rank = {name: i for i, name in enumerate(STAGE_TASKS)}
    for name, deps in argo_deps.items():
        for d in deps:
            assert d in tasks, f"{name} depends on unknown task {d}"
            if name in rank and d in rank:
                assert rank[d] < rank[name], f"{name} depends on the later stage {d}"


@pytest.mark.parametrize("task", sorted(COMMANDS))
def test_each_step_runs_its_stage_command(wt, task):
    t = task_template(wt, task)
    argv = t["container"]["command"] + t["container"]["args"]
    prog = argv.index("deepmedix")
    assert argv[prog + 1:prog + 1 + len(COMMANDS[task])] == COMMANDS[task], argv
    if prog:  # through the launcher: python -m pipelines.argo exec --overrides JSON -- deepmedix ...
        assert prog == 7 and argv[:5] == ["python", "-m", "pipelines.argo", "exec", "--overrides"], argv
        assert argv[6] == "--", argv
        assert re.fullmatch(r"\{\{workflow\.parameters\.\w+_overrides\}\}", argv[5]), argv[5]


def _click_command(words: list[str]):
    """The Typer (click) command that ``deepmedix WORDS...`` runs, or None; words past it are its arguments."""
    import typer.main

    from deepmedix.cli import app

    cmd = typer.main.get_command(app)
    for w in words:
        if not hasattr(cmd, "commands"):  # a command, not a group (typer may carry its own click)
            break
        if w not in cmd.commands:
            return None
        cmd = cmd.commands[w]
    return None if hasattr(cmd, "commands") else cmd


def _stage_options_ok(stage: str, opts: list[str]) -> None:
    from deepmedix.cluster.commands import stage_options
    from deepmedix.cluster.trainjob import STAGES

    parsed = stage_options(list(opts), STAGES[stage][1])
    assert {"data", "model", "out"} <= set(parsed) and parsed["set"] == ["a=1"]


@pytest.mark.parametrize("task", sorted(COMMANDS))
def test_options_exist_in_the_cli(wt, task):
    t = task_template(wt, task)
    argv = t["container"]["command"] + t["container"]["args"]
    argv = argv[argv.index("deepmedix") + 1:]
    words = argv[:len(COMMANDS[task])]  # the command words the step itself runs
    cmd = _click_command(words)
    assert cmd is not None, (f"step {task!r} (template {t['name']!r}) runs `deepmedix {' '.join(words)}`, which is "
                             "not a command of the deepmedix CLI (deepmedix.cli.app): the step would fail")
    rest = argv[len(words):]
    inner: list[str] = []
    if "--" in rest:
        rest, inner = rest[:rest.index("--")], rest[rest.index("--") + 1:]
    known = {o for p in cmd.params for o in p.opts}
    used = [a for a in rest if a.startswith("-")]
    assert set(used) <= known, f"deepmedix {' '.join(words)}: unknown options {set(used) - known}"
    overrides = ["--set", "a=1"] if "exec" in t["container"]["command"] else []  # what the launcher appends
    if task in TRAINING:
        _stage_options_ok(TRAINING[task], inner + overrides)
    elif overrides:
        assert "--set" in known, f"deepmedix {' '.join(words)} takes no --set"


# ------------------------------------------------------------------------------------------------ schema: Argo SDK

_ANY = (str, int, float, bool, dict, list)


def argo_errors(value, types: tuple, path: str = "") -> list[str]:
    """Problems of ``value`` against one of the argo-workflows SDK type options ``types`` (its ``openapi_types``
    values): ``(Model,)``, ``([X],)`` (list), ``({str: (X,)},)`` (map), primitives."""
    attempts = [_argo_one(value, t, path) for t in types]
    if any(not a for a in attempts):
        return []
    return attempts[0] if len(attempts) == 1 else [f"{path or '<root>'}: none of {types} fits: {attempts}"]


def _required(cls) -> list[str]:
    sig = inspect.signature(cls._from_openapi_data)
    return [p.name for p in sig.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def _argo_one(value, t, path: str) -> list[str]:
    here = path or "<root>"
    if isinstance(t, list):
        if not isinstance(value, list):
            return [f"{here}: expected a list, got {type(value).__name__}"]
        return [e for i, v in enumerate(value) for e in argo_errors(v, tuple(t), f"{path}[{i}]")]
    if isinstance(t, dict):
        if not isinstance(value, dict):
            return [f"{here}: expected a map, got {type(value).__name__}"]
        ((key_type, value_types),) = t.items()
        out = [f"{path}[{k!r}]: map key must be a {key_type.__name__}" for k in value if not isinstance(k, key_type)]
        return out + [e for k, v in value.items() for e in argo_errors(v, value_types, f"{path}[{k!r}]")]
    if isinstance(t, type) and issubclass(t, amu.ModelNormal):
        if not isinstance(value, dict):
            return [f"{here}: expected an object ({t.__name__}), got {type(value).__name__}"]
        by_json = {j: a for a, j in t.attribute_map.items()}
        out = [f"{here}: required field {t.attribute_map[a]!r} of {t.__name__} is missing"
               for a in _required(t) if t.attribute_map[a] not in value]
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if key not in by_json:
                out.append(f"{sub}: unknown field (not in {t.__name__})")
                continue
            attr = by_json[key]
            out += argo_errors(item, t.openapi_types[attr], sub)
            allowed = t.allowed_values.get((attr,))
            if allowed and item not in allowed.values():
                out.append(f"{sub}: {item!r} is not one of {sorted(allowed.values())}")
            rule = t.validations.get((attr,), {})
            if "regex" in rule and isinstance(item, str) and not re.search(rule["regex"]["pattern"], item):
                out.append(f"{sub}: {item!r} does not match {rule['regex']['pattern']}")
        return out
    if isinstance(t, type) and issubclass(t, amu.ModelSimple):
        return argo_errors(value, t.openapi_types["value"], path)
    if t is amu.none_type:
        return [] if value is None else [f"{here}: expected null"]
    if t is bool:
        return [] if isinstance(value, bool) else [f"{here}: expected a boolean, got {value!r}"]
    if t is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{here}: expected an integer, got {value!r}"]
    if t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{here}: expected a number, got {value!r}"]
    if t in (str, amu.date, amu.datetime):
        return [] if isinstance(value, str) else [f"{here}: expected a string, got {value!r}"]
    if t in (dict, list):
        return [] if isinstance(value, t) else [f"{here}: expected a {t.__name__}"]
    return [f"{here}: type {t!r} is not one the check knows"]


def test_valid_against_the_argo_sdk_models(wt):
    errors = argo_errors(wt, (ArgoWorkflowTemplate,))
    assert not errors, "\n".join(errors)


def test_the_argo_schema_check_catches_mistakes(wt):
    bad = copy.deepcopy(wt)
    tmpl = templates(bad)["sft"]
    tmpl["container"]["gpus"] = 1                                   # no such field
    tmpl["retryStrategy"] = {"limit": "1", "backof": {}}            # misspelt
    tmpl["container"]["securityContext"]["runAsUser"] = "1000"     # wrong type
    tmpl["inputs"]["parameters"].append({"value": "x"})            # Parameter.name is required
    bad["spec"]["podGC"]["strategy"] = 7
    errors = "\n".join(argo_errors(bad, (ArgoWorkflowTemplate,)))
    for needle in ("container.gpus: unknown field", "retryStrategy.backof: unknown field",
                   "securityContext.runAsUser: expected an integer", "required field 'name'",
                   "podGC.strategy: expected a string"):
        assert needle in errors, f"{needle!r} not reported:\n{errors}"


def test_hera_models_keep_every_field(wt):
    """hera's pydantic models of Argo's spec drop unknown fields and coerce types: a round trip must be lossless."""
    back = HeraWorkflowTemplate.model_validate(wt).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert back == wt


def test_core_types_against_the_kubernetes_models(wt):
    errors = []
    for name, t in templates(wt).items():
        if "container" in t:
            c = dict(t["container"], name="main")
            errors += schema_errors(c, "V1Container", f"{name}.container")
        errors += schema_errors(t.get("volumes", []), "list[V1Volume]", f"{name}.volumes")
        errors += schema_errors(t.get("tolerations", []), "list[V1Toleration]", f"{name}.tolerations")
    errors += schema_errors(wt["spec"]["securityContext"], "V1PodSecurityContext", "spec.securityContext")
    assert not errors, "\n".join(errors)


# ------------------------------------------------------------------------------------------------ references

def test_every_reference_resolves(wt):
    params = set(defaults(wt))
    for name, t in templates(wt).items():
        text = json.dumps(t)
        for ref in re.findall(r"workflow\.parameters\.(\w+)", text):
            assert ref in params, f"{name}: workflow parameter {ref!r} is not declared"
        declared = {p["name"] for p in (t.get("inputs") or {}).get("parameters", [])}
        used = set(re.findall(r"inputs\.parameters\.(\w+)", text))
        assert used == declared, f"{name}: inputs declared {sorted(declared)}, used {sorted(used)}"
    for task_name, task in dag_tasks(wt).items():
        tmpl = templates(wt)[task["template"]]
        given = {p["name"] for p in task.get("arguments", {}).get("parameters", [])}
        wanted = {p["name"] for p in (tmpl.get("inputs") or {}).get("parameters", [])}
        assert given == wanted, f"{task_name}: arguments {sorted(given)} for inputs {sorted(wanted)}"
        for ref in re.findall(r"workflow\.parameters\.(\w+)", json.dumps(task)):
            assert ref in params, f"{task_name}: workflow parameter {ref!r} is not declared"


def test_outputs_go_to_the_run_folder_of_their_own_stage(wt):
    root = "s3://{{workflow.parameters.bucket}}/runs/{{workflow.name}}/"
    for name, task in dag_tasks(wt).items():
        args = {p["name"]: p["value"] for p in task.get("arguments", {}).get("parameters", [])}
        if "out" in args:
            assert args["out"].startswith(f"{root}{name}/"), (name, args["out"])
        for key, value in args.items():
            if key != "out" and "{{=" not in value:
                stage = value[len(root):].split("/")[0] if value.startswith(root) else None
                assert stage in dag_tasks(wt), f"{name}.{key}: {value} is no stage's output"
                assert stage in _ancestors(wt, name), f"{name} reads {stage}'s output without depending on it"


def _ancestors(wt: dict, name: str) -> set[str]:
    tasks = dag_tasks(wt)
    out, todo = set(), list(tasks[name].get("dependencies", []))
    while todo:
        d = todo.pop()
        if d not in out:
            out.add(d)
            todo += tasks[d].get("dependencies", [])
    return out


# KFP pipeline parameters that Argo takes in another shape: the GPU pool as key / value strings (a map or list
# parameter cannot be spliced into nodeSelector / tolerations), the S3 Secret fixed by name, the non-secret S3
# settings as workflow parameters rather than from a ConfigMap.
KFP_ONLY = {"gpu_node_selector": ("gpu_node_selector_key", "gpu_node_selector_value"),
            "gpu_tolerations": ("gpu_toleration_key",), "s3_secret": (),
            "s3_env_configmap": ("s3_endpoint", "s3_use_https", "aws_region")}


def _as_argo_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def test_parameters_match_the_kfp_pipeline(wt):
    """The KFP pipeline's parameters exist here by the same name and default (or in the shape KFP_ONLY says)."""
    from pipelines.deepmedix_pipeline import deepmedix_pipeline

    sig = inspect.signature(getattr(deepmedix_pipeline, "pipeline_func", deepmedix_pipeline))
    params = defaults(wt)
    for name, p in sig.parameters.items():
        if name in KFP_ONLY:
            assert set(KFP_ONLY[name]) <= set(params), name
            continue
        assert name in params, f"KFP parameter {name!r} has no Argo counterpart"
        assert params[name] == _as_argo_value(p.default), (name, params[name], p.default)
    assert not any(s in argo.S3_SECRET for s in "{}") and "s3_secret" in sig.parameters
    assert sig.parameters["s3_secret"].default == argo.S3_SECRET


def test_task_groups_match_the_kfp_pipeline():
    import pipelines.deepmedix_pipeline as kfp_pipeline

    assert set(getattr(kfp_pipeline, "OPTIONAL_TASKS", argo.EXTRA_TASKS)) == set(argo.EXTRA_TASKS)
    if hasattr(kfp_pipeline, "GPU_TASKS"):
        assert set(kfp_pipeline.GPU_TASKS) == GPU_TASKS
    if hasattr(kfp_pipeline, "TRAINING_TASKS"):
        assert set(kfp_pipeline.TRAINING_TASKS) == set(TRAINING)


# ------------------------------------------------------------------------------------------------ Argo's resolution

def _to_python(expr: str) -> str:
    """The small part of expr-lang the templates use, as Python: names, '...' strings, ==, !=, >, +, asInt(),
    and one ternary ``c ? a : b``."""
    expr = re.sub(r"\bworkflow\.parameters\.(\w+)", r"P['\1']", expr)
    expr = re.sub(r"\bworkflow\.name\b", "NAME", expr).replace("asInt(", "int(")
    depth, quote, q, colon = 0, False, -1, -1
    for i, ch in enumerate(expr):
        if ch == "'":
            quote = not quote
        elif not quote and ch in "([":
            depth += 1
        elif not quote and ch in ")]":
            depth -= 1
        elif not quote and depth == 0 and ch == "?" and q < 0:
            q = i
        elif not quote and depth == 0 and ch == ":" and q >= 0 and colon < 0:
            colon = i
    if q >= 0:
        return f"({expr[q + 1:colon]}) if ({expr[:q]}) else ({expr[colon + 1:]})"
    return expr


def resolve(text: str, scope: dict[str, str], params: dict[str, str]) -> str:
    """Argo's substitution of simple ``{{name}}`` and expression ``{{=expr}}`` tags in a string."""
    def one(m: re.Match) -> str:
        if m.group(1) == "=":
            result = eval(_to_python(m.group(2)), {"__builtins__": {}}, {"P": params, "NAME": WORKFLOW_NAME,
                                                                          "int": int})
            return "true" if result is True else "false" if result is False else str(result)
        assert m.group(2) in scope, f"unresolved tag {m.group(0)}"
        return scope[m.group(2)]
    return TAG.sub(one, text)


def resolve_json(obj, scope: dict[str, str], params: dict[str, str]):
    """Tags replaced in the JSON text of ``obj`` (values JSON-escaped), as Argo does with a template."""
    def one(m: re.Match) -> str:
        return json.dumps(resolve(m.group(0), scope, params))[1:-1]
    return json.loads(TAG.sub(one, json.dumps(obj)))


def merge(base: dict, patch: dict) -> dict:
    """A strategic merge patch as Argo applies podSpecPatch: maps merged, containers matched by name."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key == "containers":
            for pc in value:
                (target,) = [c for c in out["containers"] if c["name"] == pc["name"]]
                target.update(merge(target, pc))
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def run_plan(wt: dict, overrides: dict[str, str] | None = None) -> dict[str, dict | None]:
    """Task -> the Pod Argo would create for it (None: skipped by its ``when``), with these parameters."""
    params = {**defaults(wt), **(overrides or {})}
    scope = {f"workflow.parameters.{k}": v for k, v in params.items()}
    scope["workflow.name"] = WORKFLOW_NAME
    spec = wt["spec"]
    out: dict[str, dict | None] = {}
    for name, task in dag_tasks(wt).items():
        if "when" in task and resolve(task["when"], scope, params) != "true":
            out[name] = None
            continue
        args = {p["name"]: resolve(p["value"], scope, params) for p in task.get("arguments", {}).get("parameters", [])}
        tmpl = resolve_json(templates(wt)[task["template"]],
                            {**scope, **{f"inputs.parameters.{k}": v for k, v in args.items()}}, params)
        pod_spec = {"serviceAccountName": spec["serviceAccountName"], "securityContext": spec["securityContext"],
                    "restartPolicy": "Never", "containers": [dict(tmpl["container"], name="main")]}
        for key in ("nodeSelector", "tolerations", "volumes"):
            if key in tmpl:
                pod_spec[key] = tmpl[key]
        if "podSpecPatch" in tmpl:
            pod_spec = merge(pod_spec, json.loads(tmpl["podSpecPatch"]))
        out[name] = {"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": f"{WORKFLOW_NAME}-{name}", "labels": spec["podMetadata"]["labels"]},
                     "spec": pod_spec}
    return out


SCENARIOS = {
    "defaults": {},
    "7b-multinode": {"size": "7b", "sft_nodes": "2", "sft_gpus_per_node": "8", "grpo_gpus_per_node": "8",
                     "coldstart_nodes": "1", "coldstart_gpus_per_node": "4", "synth_gpus": "0", "eval_gpus": "2",
                     "base_model_uri": "s3://models/qwen2.5-vl-7b", "run_arena": "true", "deploy": "true",
                     "deploy_namespace": "serving", "serving_gpus": "1",
                     "sft_overrides": '["max_steps=10", "lr=1e-5"]'},
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pods_as_argo_runs_them_are_valid_and_restricted(wt, scenario):
    for name, pod in run_plan(wt, SCENARIOS[scenario]).items():
        if pod is None:
            continue
        try:
            core_validate(pod)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{scenario}: {name} as a Pod: {e.message}")
        assert_restricted(pod["spec"], f"{scenario}: {name}")
        c = pod["spec"]["containers"][0]
        assert "{{" not in json.dumps(pod), f"{name}: unresolved tag"
        assert not image_errors(c["image"], name)


def test_base_model_uri_skips_the_tiny_model():
    wt = argo.render()
    plan = run_plan(wt)
    sft_args = plan["sft"]["spec"]["containers"][0]["args"]
    assert plan["base-model"] is not None
    assert sft_args[sft_args.index("--model") + 1] == f"s3://deepmedix/runs/{WORKFLOW_NAME}/base-model/model"
    plan = run_plan(wt, {"base_model_uri": "s3://models/qwen2.5-vl-7b"})
    assert plan["base-model"] is None
    sft_args = plan["sft"]["spec"]["containers"][0]["args"]
    assert sft_args[sft_args.index("--model") + 1] == "s3://models/qwen2.5-vl-7b"
    assert set(dag_tasks(wt)["sft"]["dependencies"]) >= {"base-model"}  # a skipped dependency counts as done


def test_gpu_counts_follow_the_parameters(wt):
    def gpus(plan, task):
        return plan[task]["spec"]["containers"][0]["resources"]["limits"][GPU]

    plan = run_plan(wt)
    assert {t: gpus(plan, t) for t in GPU_TASKS} == {t: "1" for t in GPU_TASKS}
    plan = run_plan(wt, SCENARIOS["7b-multinode"])
    assert gpus(plan, "sft") == "0"            # 2 nodes: the pod launches a TrainJob and waits
    assert gpus(plan, "coldstart-sft") == "4"  # 1 node, 4 GPUs under torchrun in the pod
    assert gpus(plan, "grpo") == "8"
    assert gpus(plan, "coldstart-synth") == "0"
    assert gpus(plan, "evaluate") == gpus(plan, "evaluate-coldstart") == "2"
    args = plan["sft"]["spec"]["containers"][0]["args"]
    assert args[args.index("--nodes") + 1] == "2" and args[args.index("--gpus-per-node") + 1] == "8"
    assert args[args.index("--image") + 1] == defaults(wt)["train_image"]


def test_arena_and_deploy_are_switched_by_parameters(wt):
    assert [t for t, pod in run_plan(wt).items() if pod is None] == ["arena", "deploy"]  # off, as in KFP
    plan = run_plan(wt, SCENARIOS["7b-multinode"])
    assert [t for t, pod in plan.items() if pod is None] == ["base-model"]
    args = plan["deploy"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model") + 1] == f"s3://deepmedix/runs/{WORKFLOW_NAME}/grpo/model"
    assert args[args.index("--namespace") + 1] == "serving" and args[args.index("--gpus") + 1] == "1"
    assert args[args.index("--image") + 1] == defaults(wt)["serving_image"]
    args = plan["arena"]["spec"]["containers"][0]["args"]
    assert f"grpo=s3://deepmedix/runs/{WORKFLOW_NAME}/evaluate/results" in args
    assert f"coldstart=s3://deepmedix/runs/{WORKFLOW_NAME}/evaluate-coldstart/results" in args


# ------------------------------------------------------------------------------------------------ scheduling

def test_gpu_steps_carry_gpu_limit_pool_and_shm(wt):
    for task in GPU_TASKS:
        t = task_template(wt, task)
        c = t["container"]
        assert c["resources"]["limits"][GPU] == "1", task
        assert c["image"] == "{{workflow.parameters.train_image}}", task
        assert t["nodeSelector"] == {"{{workflow.parameters.gpu_node_selector_key}}":
                                     "{{workflow.parameters.gpu_node_selector_value}}"}, task
        assert t["tolerations"] == [{"key": "{{workflow.parameters.gpu_toleration_key}}", "operator": "Exists",
                                     "effect": "NoSchedule"}], task
        shm = [v for v in t["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory" and shm[0]["emptyDir"].get("sizeLimit"), task
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"], task
        patch = json.loads(t["podSpecPatch"])  # the count from the parameters (a quantity takes no tag)
        assert patch == {"containers": [{"name": "main", "resources": {"limits": {GPU: patch["containers"][0][
            "resources"]["limits"][GPU]}}}]}, task


def test_cpu_steps_carry_none_of_it(wt):
    for task in CPU_TASKS:
        t = task_template(wt, task)
        text = json.dumps(t)
        assert GPU not in text and "/dev/shm" not in text, task
        for key in ("nodeSelector", "tolerations", "podSpecPatch", "affinity"):
            assert key not in t, (task, key)
        assert t["container"]["image"] == "{{workflow.parameters.data_image}}", task
        assert set(t["container"]["resources"]) == {"requests"}, task


def test_retries_only_outside_training(wt):
    for task in COMMANDS:
        t = task_template(wt, task)
        if task in TRAINING:
            assert "retryStrategy" not in t, task
        else:
            assert t["retryStrategy"]["retryPolicy"] == "OnError", task  # pod errors, not a failing stage


def test_workflow_gc_and_ttl(wt):
    spec = wt["spec"]
    assert spec["podGC"]["strategy"] in ("OnPodSuccess", "OnPodCompletion", "OnWorkflowSuccess",
                                         "OnWorkflowCompletion")
    ttl = spec["ttlStrategy"]
    assert 0 < ttl["secondsAfterSuccess"] <= ttl["secondsAfterFailure"]


# ------------------------------------------------------------------------------------------------ security

def test_pods_restricted(wt):
    psc = wt["spec"]["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 1000 and psc["runAsGroup"] == 1000
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    for name, t in templates(wt).items():
        if "container" not in t:
            continue
        sc = t["container"]["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, name
        assert sc.get("privileged") is not True and sc["runAsNonRoot"] is True, name
        for v in t.get("volumes", []):
            assert set(v) - {"name"} == {"emptyDir"}, (name, v)


def test_secrets_by_name_only(wt):
    assert not secret_errors([wt]), secret_errors([wt])
    text = argo.render_yaml()
    assert "kind: Secret" not in text and "stringData" not in text
    for name, t in templates(wt).items():
        if "container" not in t:
            continue
        env = {e["name"]: e for e in t["container"]["env"]}
        for key in argo.S3_SECRET_KEYS:
            assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "deepmedix-s3", "key": key}}}, \
                name
        for e in env.values():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert set(e) == {"name", "valueFrom"} and ref["name"] in ("deepmedix-s3", "deepmedix-judge"), e
                assert "{{" not in json.dumps(ref), e  # a fixed Secret, not one a submitter picks
            else:
                assert set(e) == {"name", "value"}, e
        for key in ("S3_ENDPOINT", "S3_USE_HTTPS", "AWS_REGION"):
            assert env[key]["value"].startswith("{{workflow.parameters."), (name, key)


def test_no_literal_credentials_in_parameters(wt):
    for p in wt["spec"]["arguments"]["parameters"]:
        name = p["name"].lower()
        assert not any(w in name for w in ("secret", "password", "token", "access_key", "api_key")), p


# ------------------------------------------------------------------------------------------------ the launcher

def test_expand_overrides():
    assert argo.expand_overrides("[]") == [] and argo.expand_overrides("") == []
    assert argo.expand_overrides('["a=1", "b.c=x y", "d=[1, 2]"]') == \
        ["--set", "a=1", "--set", "b.c=x y", "--set", "d=[1, 2]"]
    for bad in ('{"a": 1}', "a=1", '["a"]', "[1]", '["=1"]', "[", '"a=1"'):
        with pytest.raises(ValueError, match="--overrides"):
            argo.expand_overrides(bad)


ECHO = "import json, sys; print(json.dumps(sys.argv[1:]))"
NO_HERA = "import sys; sys.modules['hera'] = None; sys.modules['hera.workflows'] = None; " \
          "from pipelines.argo import main; sys.exit(main())"


def test_exec_runs_the_command_with_the_overrides_and_without_hera():
    proc = subprocess.run([sys.executable, "-c", NO_HERA, "exec", "--overrides", '["max_steps=10", "lr=1e-5"]', "--",
                           sys.executable, "-c", ECHO, "stage", "run", "sft", "--", "--data", "s3://b/d"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["stage", "run", "sft", "--", "--data", "s3://b/d",
                                       "--set", "max_steps=10", "--set", "lr=1e-5"]


@pytest.mark.parametrize("argv, message", [
    (["exec", "--overrides", "not json", "--", "true"], "--overrides: not JSON"),
    (["exec", "--overrides", '["a=1"]'], "usage:"),
    (["exec", "--"], "no command"),
])
def test_exec_refuses_bad_input(argv, message):
    proc = subprocess.run([sys.executable, "-c", NO_HERA, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)
