"""The Kubernetes API as the stages use it: in a pod, the pod's ServiceAccount; elsewhere ``~/.kube/config``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deepmedix.errors import ClusterError

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
S3_SECRET = "deepmedix-s3"
S3_ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")  # read from the Secret, by name
S3_PLAIN_ENV = ("S3_ENDPOINT", "S3_USE_HTTPS", "AWS_REGION")  # not secret: passed on as values


@dataclass
class Api:
    custom: object
    core: object


def api() -> Api:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:  # KUBECONFIG read now: the client reads it once, at its import
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except Exception as exc:  # noqa: BLE001 - no cluster to talk to: say so plainly
            raise ClusterError(f"no Kubernetes API: not in a pod and no usable kubeconfig ({exc})") from None
    return Api(client.CustomObjectsApi(), client.CoreV1Api())


def current_namespace(default: str = "default") -> str:
    if SA_NAMESPACE.exists():
        return SA_NAMESPACE.read_text().strip() or default
    return os.environ.get("POD_NAMESPACE", default)


def condition(obj: dict, kind: str) -> dict | None:
    """The status condition of type ``kind`` of a custom object, if any."""
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


def s3_env(secret: str = S3_SECRET) -> list[dict]:
    """The store's S3 settings for a pod: credentials by reference to ``secret``, the rest copied from this
    process's environment (endpoint, https, region: not secret)."""
    env = [{"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k}}} for k in S3_ENV_KEYS]
    env += [{"name": k, "value": os.environ[k]} for k in S3_PLAIN_ENV if os.environ.get(k)]
    return env


class Failed(ClusterError):
    """The object reached a final, failed state (its controller said so)."""


def wait_for(get: Callable[[], dict], verdict: Callable[[dict], tuple[bool, str | None]], what: str,
             timeout_s: float, poll_s: float = 10.0, log: Callable[[str], None] = print) -> dict:
    """Poll ``get()`` until ``verdict(obj)`` says done: ``(True, None)`` succeeded, ``(True, reason)`` failed
    (ClusterError with the reason). Timeout: ClusterError."""
    deadline = time.monotonic() + timeout_s
    last = None
    errors = 0
    while True:
        try:
            obj = get()
            errors = 0
        except Exception as exc:  # noqa: BLE001 - a transient API error (500, reset) must not end a days-long wait
            errors += 1
            if errors > 10 or time.monotonic() > deadline:
                raise ClusterError(f"{what}: the API keeps failing ({type(exc).__name__}: {exc})") from None
            log(f"{what}: API error ({type(exc).__name__}), retrying")
            time.sleep(min(poll_s, 30))
            continue
        done, failure = verdict(obj)
        if done and failure:
            raise Failed(f"{what} failed: {failure}")
        if done:
            return obj
        state = describe(obj)
        if state != last:
            log(f"{what}: {state}")
            last = state
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not done after {timeout_s:.0f} s (last state: {state})")
        time.sleep(poll_s)


def describe(obj: dict) -> str:
    conds = (obj.get("status") or {}).get("conditions") or []
    return ", ".join(f"{c.get('type')}={c.get('status')}" + (f" ({c.get('reason')})" if c.get("reason") else "")
                     for c in conds) or "no status yet"
