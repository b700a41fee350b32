"""``deepmedix pipeline submit``: compile the pipeline and create a run on a KFP API server with ``kfp.Client``.

The parameters file is YAML, one key per pipeline parameter (``deepmedix pipeline submit --help``; the keys are
those of :func:`pipelines.deepmedix_pipeline.deepmedix_pipeline`). It is checked before anything is sent:
an unknown key or a value of the wrong type is an error naming the file and the key.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from pathlib import Path

from deepmedix.errors import ClusterError, InputError
from pipelines.deepmedix_pipeline import deepmedix_pipeline

_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,), list: (list,), dict: (dict,)}


def pipeline_parameters() -> dict[str, tuple[type, object]]:
    """name -> (type, default) of the pipeline's parameters."""
    sig = inspect.signature(deepmedix_pipeline.pipeline_func)
    return {n: (p.annotation, p.default) for n, p in sig.parameters.items()}


def check_params(params: dict, where: str = "parameters") -> dict:
    known = pipeline_parameters()
    if not isinstance(params, dict):
        raise InputError(f"{where}: expected a mapping of pipeline parameters, got {type(params).__name__}")
    for key, value in params.items():
        if key not in known:
            raise InputError(f"{where}: {key!r} is not a pipeline parameter (known: {', '.join(sorted(known))})")
        kind = known[key][0]
        ok = _TYPES.get(kind, (object,))
        if isinstance(value, bool) and kind is not bool or not isinstance(value, ok):
            raise InputError(f"{where}: {key}: expected {kind.__name__}, got {type(value).__name__} ({value!r})")
    if "size" in params:  # every stage's config for that size, resolved before anything is sent
        from deepmedix.config import load_size

        load_size(params["size"])
    return params


def load_params(path: str) -> dict:
    from deepmedix.config import read_mapping

    return check_params(read_mapping(path, "parameters file"), str(path))


def submit(host: str, params: dict, experiment: str = "deepmedix", run_name: str = "", namespace: str = "",
           token: str | None = None, pipeline_root: str = "") -> dict:
    """Compile, then ``kfp.Client(host).create_run_from_pipeline_package``. Returns the run id and its URL."""
    from kfp import Client

    from pipelines.compile import compile_pipeline

    check_params(params)
    if pipeline_root and not pipeline_root.startswith("s3://"):
        # the training steps, their TrainJobs and deploy read their inputs by s3:// URI (DeepMedix's store);
        # KFP's own minio:// root is not one they can read
        raise InputError(f"--pipeline-root: {pipeline_root!r} is not an s3://bucket/prefix URI")
    multi_user = _healthz(host, token).get("multi_user")
    if multi_user and not namespace:
        raise InputError(f"KFP API at {host} is multi-user (Kubeflow profiles): pass --namespace <your profile's "
                         "namespace>")
    run_name = run_name or f"deepmedix-r1-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "deepmedix_pipeline.yaml")
        try:
            client = Client(host=host, namespace=namespace or None, existing_token=token)
            run = client.create_run_from_pipeline_package(str(package), arguments=params, run_name=run_name,
                                                          experiment_name=experiment,
                                                          namespace=namespace or None,
                                                          pipeline_root=pipeline_root or None)
        except Exception as exc:  # noqa: BLE001 - connection refused, 401/403, 404 (wrong path), ...
            raise ClusterError(f"KFP API at {host}: could not create the run ({_reason(exc)})") from None
    return {"run_id": run.run_id, "run_name": run_name, "experiment": experiment,
            "url": f"{host.rstrip('/')}/#/runs/details/{run.run_id}"}


def _healthz(host: str, token: str | None) -> dict:
    """``GET /apis/v2beta1/healthz`` once, before kfp.Client (which retries it five times, 5 s apart, and then
    reports a TimeoutError without the HTTP status): a wrong path, a missing token or a refused connection is
    said at once, with the status."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{host.rstrip('/')}/apis/v2beta1/healthz",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
        return json.loads(body or b"{}")
    except ValueError:  # an auth proxy (Dex, oauth2-proxy) answers an unauthenticated call with its login page
        raise ClusterError(f"KFP API at {host}: /apis/v2beta1/healthz answered with something that is not JSON (a "
                           "login page?): pass a token (--token-env names the variable that holds it)") from None
    except urllib.error.HTTPError as exc:
        hint = {401: " (a token is needed: --token-env names the variable that holds it)",
                403: " (the token's identity may not use this namespace)",
                404: " (not the KFP API: a Kubeflow install serves it under https://<host>/pipeline)"}
        raise ClusterError(f"KFP API at {host}: HTTP {exc.code} {exc.reason} on /apis/v2beta1/healthz"
                           f"{hint.get(exc.code, '')}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ClusterError(f"KFP API at {host}: not reachable ({getattr(exc, 'reason', exc)})") from None


def _reason(exc: Exception) -> str:
    """One line: the HTTP status, reason and the body's first line for an API error; else the exception."""
    if getattr(exc, "status", None):
        body = (getattr(exc, "body", "") or "")
        body = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
        return f"HTTP {exc.status} {getattr(exc, 'reason', '')}: {body.strip().splitlines()[0] if body.strip() else ''}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
