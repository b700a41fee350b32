"""What each pipeline step's pod requests (CPU, memory), one table for the KFP pipeline and the Argo
WorkflowTemplate. A pod without requests is scheduled as if it needed nothing and is the first evicted under
memory pressure, while the GPU steps mount a memory-backed /dev/shm that counts against their memory."""

from __future__ import annotations

# step (display name) -> (cpu, memory); limits are left to the namespace's LimitRange
REQUESTS: dict[str, tuple[str, str]] = {
    "step-gpus": ("100m", "256Mi"),
    "curate": ("2", "8Gi"),
    "base-model": ("1", "4Gi"),
    "sft": ("8", "64Gi"),
    "coldstart-synth": ("4", "32Gi"),
    "coldstart-sft": ("8", "64Gi"),
    "evaluate-coldstart": ("4", "32Gi"),
    "grpo": ("8", "64Gi"),
    "evaluate": ("4", "32Gi"),
    "arena": ("1", "4Gi"),
    "deploy": ("250m", "512Mi"),
}


def requests(step: str) -> dict[str, str]:
    """``{"cpu": ..., "memory": ...}`` of ``step``."""
    cpu, memory = REQUESTS[step]
    return {"cpu": cpu, "memory": memory}
