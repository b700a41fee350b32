"""Clients of large language models behind OpenAI-compatible APIs (:mod:`.client`)."""
