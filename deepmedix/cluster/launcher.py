"""The namespace's ``kfp-launcher`` ConfigMap, which KFP's driver and launcher read for every run: merge DeepMedix's
pipeline root and S3 provider into the one KFP made, instead of owning it.

Why a merge: in a Kubeflow profile namespace the profile controller creates ``kfp-launcher`` with a ``minio://``
root, a ``clusterDomain`` and no ``providers`` (kubeflow/pipelines manifests/kustomize/base/installs/multi-user/
pipelines-profile-controller/sync.py, 2.15+), and never updates it again (decorator-controller.yaml: the
ConfigMap attachment's updateStrategy is OnDelete), so a merged value stays; KFP standalone has its own. A chart
that creates ``kfp-launcher`` collides with either. Without ``providers.s3`` the launcher opens an ``s3://`` root
with the AWS SDK's defaults (backend/src/v2/objectstore/object_store.go OpenBucket), i.e. AWS's own endpoint.
"""

from __future__ import annotations

import copy
from typing import Callable

import yaml

from deepmedix.cluster.k8s import ClusterError, api

LAUNCHER = "kfp-launcher"


def merged(live: dict, desired: dict) -> dict:
    """``live``'s data with ``defaultPipelineRoot`` and the ``default`` entry of each provider of ``desired``
    (``s3``); every other key (``clusterDomain``), provider (``minio``, ``gs``) and an admin's per-bucket
    ``overrides`` kept."""
    out = dict(live)
    if desired.get("defaultPipelineRoot"):
        out["defaultPipelineRoot"] = desired["defaultPipelineRoot"]
    want = yaml.safe_load(desired.get("providers") or "") or {}
    if want:
        try:
            have = yaml.safe_load(live.get("providers") or "") or {}
        except yaml.YAMLError as exc:
            raise ClusterError(f"ConfigMap {LAUNCHER}: its providers are not valid YAML ({exc}); fix or remove "
                               "them first") from None
        have = copy.deepcopy(have) if isinstance(have, dict) else {}
        for provider, settings in want.items():
            entry = have.get(provider) if isinstance(have.get(provider), dict) else {}
            have[provider] = {**entry, **settings}
        out["providers"] = yaml.safe_dump(have, sort_keys=False)
    return out


def merge_launcher_config(namespace: str, source: str, tries: int = 3, log: Callable[[str], None] = print) -> dict:
    """Merge the data of ConfigMap ``source`` (the chart's ``<release>-kfp-launcher``) into ``kfp-launcher`` in
    ``namespace``, creating it when missing. Returns the resulting data."""
    from kubernetes.client.exceptions import ApiException

    core = api().core
    try:
        desired = core.read_namespaced_config_map(source, namespace).data or {}
    except ApiException as exc:
        raise ClusterError(f"ConfigMap {namespace}/{source}: {exc.status} {exc.reason}") from None
    for attempt in range(tries):
        try:
            live = core.read_namespaced_config_map(LAUNCHER, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise ClusterError(f"ConfigMap {namespace}/{LAUNCHER}: {exc.status} {exc.reason}") from None
            live = None
        try:
            if live is None:
                data = merged({}, desired)
                core.create_namespaced_config_map(namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
                    "name": LAUNCHER, "namespace": namespace}, "data": data})
                log(f"ConfigMap {namespace}/{LAUNCHER} created: root {data.get('defaultPipelineRoot')}")
                return data
            data = merged(live.data or {}, desired)
            live.data = data  # the live object itself: its owner references (the profile controller), finalizers,
            core.replace_namespaced_config_map(LAUNCHER, namespace, live)  # labels and resourceVersion stay
            log(f"ConfigMap {namespace}/{LAUNCHER} updated: root {data.get('defaultPipelineRoot')}, providers "
                f"{sorted((yaml.safe_load(data.get('providers') or '') or {}))}; kept "
                f"{sorted(set(data) - {'defaultPipelineRoot', 'providers'}) or 'nothing else'}")
            return data
        except ApiException as exc:
            if exc.status == 409 and attempt < tries - 1:
                continue  # changed (or created) in between: read it again
            raise ClusterError(f"ConfigMap {namespace}/{LAUNCHER}: {exc.status} {exc.reason}") from None
    raise ClusterError(f"ConfigMap {namespace}/{LAUNCHER}: kept changing under the merge")
