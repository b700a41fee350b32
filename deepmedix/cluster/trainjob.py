"""Training stages on more than one GPU: ``torchrun`` in the step's own pod for one node, a Kubeflow Trainer
``TrainJob`` (runtime ``torch-distributed``: torchrun on every node, DeepSpeed ZeRO-3 from the stage's config)
for several.

A multi-node run cannot write into the pipeline step's local artifact folder, so the TrainJob reads its inputs
from their ``s3://`` URIs and writes its model to the output's ``s3://`` URI; the step then copies the result
into its local output folder, which the KFP launcher uploads as usual. While the TrainJob runs, the step
streams the logs of its first node and fails with the TrainJob's own reason when it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from deepmedix.cluster.k8s import S3_SECRET, ClusterError, Failed, api, condition, current_namespace, s3_env, wait_for
from deepmedix.errors import InputError, sigterm_exits

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
RUNTIME = "torch-distributed"
NODE = "node"  # the torch-distributed runtime's replicated job and container
# stage -> (CLI words, the option that names its training data)
STAGES = {"sft": (["train", "sft"], "--data"), "coldstart": (["train", "coldstart"], "--traces"),
          "grpo": (["train", "grpo"], "--data")}


@dataclass
class GpuPool:
    """Where GPU pods go. Defaults fit the NVIDIA GPU operator's node label and the usual GPU-node taint."""
    node_selector: dict = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    tolerations: list = field(default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                        "effect": "NoSchedule"}])
    resource: str = "nvidia.com/gpu"
    shm_size: str = "32Gi"
    cpu_per_node: str = "16"
    memory_per_node: str = "128Gi"


def stage_args(stage: str, data: str, model: str, out: str, size: str, overrides: list[str]) -> list[str]:
    """``deepmedix`` CLI arguments for one training stage."""
    if stage not in STAGES:
        raise InputError(f"stage: {stage!r} is not one of {sorted(STAGES)}")
    words, data_opt = STAGES[stage]
    args = [*words, data_opt, data, "--model", model, "--out", out, "--config", size]
    for o in overrides:
        args += ["--set", o]
    return args


def owner_reference() -> list[dict]:
    """The pipeline step's pod as the TrainJob's owner (KFP puts its name and UID in the step's environment):
    when the run is cancelled and the pod deleted, Kubernetes deletes the TrainJob and frees its GPUs."""
    name, uid = os.environ.get("KFP_POD_NAME"), os.environ.get("KFP_POD_UID")
    if not (name and uid):
        return []
    return [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid, "blockOwnerDeletion": False}]


def trainjob_manifest(name: str, namespace: str, image: str, args: list[str], nodes: int, gpus_per_node: int,
                      pool: GpuPool | None = None, s3_secret: str = S3_SECRET, runtime: str = RUNTIME,
                      service_account: str | None = None, owners: list[dict] | None = None) -> dict:
    """A TrainJob running ``torchrun -m deepmedix.cli ARGS`` on ``nodes`` nodes of ``gpus_per_node`` GPUs. Needs
    Kubeflow Trainer >= 2.2 (``spec.runtimePatches``, which carries the pool, ``/dev/shm`` and the security context,
    came in 2.2: kubeflow/trainer pkg/apis/trainer/v1alpha1/trainjob_types.go; 2.0 had podSpecOverrides, 2.1
    podTemplateOverrides)."""
    pool = pool or GpuPool()
    gpus = str(gpus_per_node)
    pod_spec = {
        "nodeSelector": dict(pool.node_selector),
        "tolerations": list(pool.tolerations),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pool.shm_size}}],
        "containers": [{"name": NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}],
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    metadata = {"name": name, "namespace": namespace,
                "labels": {"app.kubernetes.io/part-of": "deepmedix", "app.kubernetes.io/component": "training"}}
    if owners:
        metadata["ownerReferences"] = owners
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"name": runtime, "kind": "ClusterTrainingRuntime", "apiGroup": GROUP},
            "trainer": {
                "image": image,
                "command": ["torchrun", "-m", "deepmedix.cli", *args],
                "numNodes": int(nodes),
                "numProcPerNode": int(gpus_per_node),
                "resourcesPerNode": {"requests": {"cpu": pool.cpu_per_node, "memory": pool.memory_per_node,
                                                  pool.resource: gpus},
                                     "limits": {"memory": pool.memory_per_node, pool.resource: gpus}},
                "env": s3_env(s3_secret) + [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}],
            },
            "runtimePatches": [{"manager": "deepmedix.io/pipeline", "trainingRuntimeSpec": {"template": {"spec": {
                "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {
                    # no service-mesh sidecar (Kubeflow profile namespaces inject Istio): NCCL goes node to node
                    # and a Job's pod must be able to finish
                    "metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
                    "spec": pod_spec}}}}]}}}}],
        },
    }


def trainjob_verdict(obj: dict) -> tuple[bool, str | None]:
    """(done, failure reason) from a TrainJob's status conditions (``Complete`` / ``Failed``)."""
    failed = condition(obj, "Failed")
    if failed and failed.get("status") == "True":
        return True, f"{failed.get('reason') or 'Failed'}: {failed.get('message') or 'no message'}"
    complete = condition(obj, "Complete")
    if complete and complete.get("status") == "True":
        return True, None
    return False, None


def _stream_logs(core, namespace: str, name: str, stop: threading.Event, log: Callable[[str], None],
                 following: threading.Event | None = None) -> None:
    """Follow the first node's pod log (JobSet labels), line by line, until ``stop`` is set. The pods are watched
    (a list, then a stream of changes), so the log starts the moment the pod runs, and a pod that replaces it after
    a restart (a new UID) is followed next."""
    from kubernetes import watch

    selector = f"jobset.sigs.k8s.io/jobset-name={name},batch.kubernetes.io/job-completion-index=0"
    followed: set[str] = set()
    failures: set[str] = set()
    while not stop.is_set():
        w = watch.Watch()
        try:
            for event in w.stream(core.list_namespaced_pod, namespace, label_selector=selector, timeout_seconds=30):
                pod = event["object"]
                if stop.is_set():
                    break
                if event["type"] == "DELETED" or pod.metadata.uid in followed or \
                        pod.status.phase not in ("Running", "Succeeded", "Failed"):
                    continue
                followed.add(pod.metadata.uid)
                if following is not None:
                    following.set()
                _follow(core, namespace, pod.metadata.name, stop, log)
                if following is not None:
                    following.clear()
        except Exception as exc:  # noqa: BLE001 - logs are a courtesy; the verdict comes from the TrainJob
            reason = f"{getattr(exc, 'status', '')} {getattr(exc, 'reason', '') or type(exc).__name__}".strip()
            if reason not in failures:  # said once (a 403 would repeat every 10 s)
                failures.add(reason)
                log(f"TrainJob {namespace}/{name}: cannot watch its pods for logs ({reason}); still waiting for it")
            stop.wait(10)
        finally:
            w.stop()


def _follow(core, namespace: str, pod: str, stop: threading.Event, log: Callable[[str], None]) -> None:
    try:
        resp = core.read_namespaced_pod_log(pod, namespace, container=NODE, follow=True, _preload_content=False)
        tail = b""
        for chunk in resp.stream():
            *lines, tail = (tail + chunk).split(b"\n")
            for line in lines:
                log(f"[{pod}] {line.decode(errors='replace').rstrip()}")
            if stop.is_set():
                break
        if tail:
            log(f"[{pod}] {tail.decode(errors='replace').rstrip()}")
    except Exception as exc:  # noqa: BLE001
        log(f"[{pod}] log stream ended: {exc}")


def run_trainjob(manifest: dict, timeout_s: float = 7 * 24 * 3600, poll_s: float = 15.0,
                 log: Callable[[str], None] = print) -> dict:
    """Create the TrainJob, stream its logs, wait for ``Complete`` (returned) or ``Failed`` (ClusterError with
    the TrainJob's reason and message). On any other way out (timeout, a signal, an error) the TrainJob is
    deleted, so that no GPU stays held by a job nobody waits for."""
    k = api()
    ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        created = k.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest)
    except Exception as exc:  # noqa: BLE001 - ApiException carries the API server's reason
        raise ClusterError(f"TrainJob {ns}/{name}: could not be created: {getattr(exc, 'reason', '')} "
                           f"{getattr(exc, 'body', exc)}") from None
    stop = threading.Event()
    done = False
    following = threading.Event()  # a log being followed: worth waiting for its last lines at the end
    streamer = threading.Thread(target=_stream_logs, args=(k.core, ns, name, stop, log, following), daemon=True)
    with sigterm_exits():  # a cancelled run's step gets SIGTERM: it leaves through the finally below
        try:
            if "runtimePatches" not in (created or {}).get("spec", {}):
                raise ClusterError(f"TrainJob {ns}/{name}: the cluster's Trainer dropped spec.runtimePatches (GPU "
                                   "pool, /dev/shm, security context); Kubeflow Trainer >= 2.2 is needed")
            log(f"TrainJob {ns}/{name} created: {manifest['spec']['trainer']['numNodes']} nodes x "
                f"{manifest['spec']['trainer']['numProcPerNode']} GPUs")
            streamer.start()
            obj = wait_for(lambda: k.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name),
                           trainjob_verdict, f"TrainJob {ns}/{name}", timeout_s, poll_s, log)
            done = True
            return obj
        except Failed:
            done = True  # the TrainJob ended by itself: keep it for its logs and events
            raise
        finally:
            stop.set()
            if streamer.is_alive():  # (a thread blocked in the watch has nothing more to say: not waited for)
                streamer.join(10 if following.is_set() else 0.5)
            if not done:
                try:
                    k.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
                    log(f"TrainJob {ns}/{name} deleted")
                except Exception as exc:  # noqa: BLE001
                    log(f"TrainJob {ns}/{name}: could not delete it ({exc}); delete it by hand")


def durable_checkpoints(stage: str, out: tuple[str, str], overrides: list[str],
                        log: Callable[[str], None] = print) -> tuple[list[str], bool]:
    """A KFP step trains into a local folder the launcher uploads at the end, so its checkpoints would sit on the
    pod's disk and die with it (eviction, preemption, node loss). When the output has a remote URI, checkpoints go
    beside it on S3 (``<uri>-checkpoints``, the layout the multi-node path and the CLI use; the deploy URI's
    trailing ``/`` keeps KServe from fetching them), and a step that finds committed checkpoints of this same run
    there (an attempt re-run on the same output URI) resumes from the newest. Returns (overrides, resume)."""
    local, remote = out
    if local == remote or not str(remote).startswith("s3://") or any(o.startswith("checkpoint_uri=")
                                                                      for o in overrides):
        return list(overrides), False
    from deepmedix.train.checkpoints import committed_checkpoints, default_checkpoint_uri

    ckpt = default_checkpoint_uri(remote)
    found = committed_checkpoints(ckpt)
    if found:
        log(f"{stage}: {len(found)} committed checkpoint(s) under {ckpt} from an earlier attempt: resuming")
    return [*overrides, f"checkpoint_uri={ckpt}"], bool(found)


def run_training(stage: str, data: tuple[str, str], model: tuple[str, str], out: tuple[str, str], size: str,
                 overrides: list[str], nodes: int = 1, gpus_per_node: int = 1, image: str = "",
                 namespace: str = "", pool: GpuPool | None = None, s3_secret: str = S3_SECRET,
                 log: Callable[[str], None] = print, poll_s: float = 15.0, timeout_s: float = 7 * 24 * 3600) -> dict:
    """One training stage. ``data``, ``model`` and ``out`` are ``(local path, remote URI)`` pairs (a KFP
    artifact's ``path`` and ``uri``; an input's local path may be None: the stage reads the URI itself). One node:
    in this process (one GPU; the stage's result with its metrics is returned) or under ``torchrun`` (several).
    Several nodes: a TrainJob on the remote URIs, which writes the model to ``out``'s URI itself."""
    if nodes <= 1:
        data_in, model_in = data[0] or data[1], model[0] or model[1]
        overrides, resume = durable_checkpoints(stage, out, overrides, log)
    if nodes <= 1 and gpus_per_node <= 1:
        from deepmedix import stages

        run = {"sft": stages.sft, "coldstart": stages.coldstart_sft, "grpo": stages.grpo}[stage]
        return run(data_in, model_in, out[0], size, overrides, resume=resume)
    if nodes <= 1:
        log(f"{stage}: one node, {gpus_per_node} GPUs under torchrun")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={gpus_per_node}", "-m", "deepmedix.cli",
                        *stage_args(stage, data_in, model_in, out[0], size, overrides),
                        *(["--resume"] if resume else [])], check=True)
        return {"stage": stage, "nodes": 1, "gpus_per_node": gpus_per_node}
    remote = [u for _, u in (data, model, out)]
    if not all(u.startswith("s3://") for u in remote):
        raise ClusterError(f"{stage}: a multi-node run needs s3:// inputs and output (pipeline_root on S3); got "
                           f"{remote}")
    if not image:
        raise ClusterError(f"{stage}: a multi-node run needs the training image (--image)")
    if not os.environ.get("S3_ENDPOINT"):
        raise ClusterError(f"{stage}: S3_ENDPOINT is not set in this step, so the TrainJob's nodes could not reach "
                           "the store (the ConfigMap deepmedix-s3-env provides it)")
    name = f"deepmedix-{stage}-{uuid.uuid4().hex[:8]}"
    manifest = trainjob_manifest(name, namespace or current_namespace(), image,
                                 stage_args(stage, data[1], model[1], out[1], size, overrides), nodes,
                                 gpus_per_node, pool, s3_secret=s3_secret, owners=owner_reference())
    run_trainjob(manifest, timeout_s=timeout_s, poll_s=poll_s, log=log)
    if out[0] and out[0] != out[1]:
        # a KFP step: the TrainJob wrote the model to the output artifact's own URI, and the launcher uploads
        # whatever the local output folder holds to that URI (backend/src/v2/objectstore UploadBlob: each file of
        # the folder, none for an empty one), so the folder is left empty: nothing is copied back through this pod
        Path(out[0]).mkdir(parents=True, exist_ok=True)
    return {"stage": stage, "nodes": nodes, "gpus_per_node": gpus_per_node, "trainjob": name}
