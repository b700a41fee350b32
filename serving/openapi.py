"""The server's OpenAPI 3.0 document (served at ``GET /openapi.json``): what each route accepts, so clients and
fuzzers (the test suite runs schemathesis against it) know the contract. KServe's v1 route reads the raw body
and its v2 models are generic, so the document is written here rather than generated."""

from __future__ import annotations

from importlib import metadata

from serving.inputs import Limits

_ERROR = {"type": "object", "properties": {"error": {}}, "required": ["error"]}


def _resp(desc: str, schema: dict | None = None) -> dict:
    out = {"description": desc}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


def _sampling(limits: Limits) -> dict:
    return {
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens_limit},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "overlay": {"type": "boolean"},
    }


def build_openapi(name: str, limits: Limits, v2: bool = True) -> dict:
    """``v2=False``: without the v2 routes (the grounding transformer serves v1 and OpenAI only)."""
    image = {"type": "string", "minLength": 1, "description": "base64 PNG, JPEG or DICOM, or a data: URL"}
    question = {"type": "string", "minLength": 1, "maxLength": limits.max_text_chars}
    views = {"type": "array", "minItems": 1, "maxItems": limits.max_views, "items": image,
             "description": "the views of one study, in order (the model calls them Picture 1, Picture 2, ...); "
                            "each answer box is in the pixels of the view it is on (grounding.box_views)"}
    model_name = {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string", "enum": [name]}}
    errors = {"400": _resp("invalid request (the message names the field)", _ERROR),
              "401": _resp("missing or wrong bearer token", _ERROR),
              "403": _resp("a refused route (the model repository extension)", _ERROR),
              "404": _resp("unknown model", _ERROR),
              "413": _resp("request body too large", _ERROR),
              "422": _resp("request body does not match the schema"),
              "429": _resp("queue full; see Retry-After", _ERROR),
              "503": _resp("not ready or timed out; see Retry-After", _ERROR)}
    v1_request = {
        "type": "object", "required": ["instances"],
        "properties": {"instances": {
            "type": "array", "minItems": 1, "maxItems": limits.max_instances,
            "items": {"type": "object", "required": ["question"],
                      "oneOf": [{"required": ["image"]}, {"required": ["images"]}],  # one of them, not both
                      "properties": {"image": {"oneOf": [image, views]}, "images": views, "question": question,
                                     **_sampling(limits)}}}},
    }
    tensor = {"type": "object", "required": ["name", "shape", "datatype", "data"],
              "properties": {"name": {"type": "string", "enum": ["image", "text", "max_new_tokens"]},
                             "shape": {"type": "array", "items": {"type": "integer", "minimum": 0},
                                       "description": "image: [queries] (one view each) or [queries, views]; "
                                                      "text and max_new_tokens: [queries] or [1]"},
                             "datatype": {"type": "string", "enum": ["BYTES", "INT32", "INT64"]},
                             "parameters": {"type": "object"},
                             "data": {"type": "array"}}}
    v2_request = {"type": "object", "required": ["inputs"],
                  "properties": {"id": {"type": "string"},
                                 "parameters": {"type": "object", "properties": _sampling(limits)},
                                 "inputs": {"type": "array", "minItems": 2, "maxItems": 3, "items": tensor}}}
    part = {"oneOf": [
        {"type": "object", "required": ["type", "text"], "properties": {"type": {"enum": ["text"]},
                                                                        "text": {"type": "string"}}},
        {"type": "object", "required": ["type", "image_url"], "properties": {
            "type": {"enum": ["image_url"]},
            "image_url": {"type": "object", "required": ["url"], "properties": {
                "url": {"type": "string", "pattern": "^data:image/"}, "detail": {"type": "string"}}}}}]}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": part}]}}}
    chat_request = {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string", "enum": [name]},
        "messages": {"type": "array", "minItems": 1, "items": message},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens_limit},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": limits.max_new_tokens_limit},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "n": {"type": "integer", "enum": [1]},
        "stream": {"type": "boolean"},
        "overlay": {"type": "boolean"}}}
    ok = {"type": "object"}
    doc = {
        "openapi": "3.0.3",
        "info": {"title": "DeepMedix-R1 model server (KServe)", "version": metadata.version("deepmedix")},
        "paths": {
            "/v1/models/{model_name}:predict": {"post": {
                "operationId": "v1_predict", "parameters": [model_name],
                "requestBody": {"required": True, "content": {"application/json": {"schema": v1_request}}},
                "responses": {"200": _resp("grounded predictions", ok), **errors}}},
            "/v2/models/{model_name}/infer": {"post": {
                "operationId": "v2_infer", "parameters": [model_name],
                "requestBody": {"required": True, "content": {"application/json": {"schema": v2_request}}},
                "responses": {"200": _resp("Open Inference Protocol response", ok), **errors}}},
            "/openai/v1/chat/completions": {"post": {
                "operationId": "openai_chat",
                "requestBody": {"required": True, "content": {"application/json": {"schema": chat_request}}},
                "responses": {"200": _resp("chat.completion with grounding", ok), **errors}}},
            "/openai/v1/models": {"get": {"operationId": "openai_models",
                                          "responses": {"200": _resp("the served model", ok)}}},
            "/v1/models/{model_name}": {"get": {"operationId": "v1_model_ready", "parameters": [model_name],
                                                "responses": {"200": _resp("ready", ok), **errors}}},
            "/v2/models/{model_name}/ready": {"get": {"operationId": "v2_model_ready", "parameters": [model_name],
                                                      "responses": {"200": _resp("ready", ok), **errors}}},
            "/v2/health/live": {"get": {"operationId": "live", "responses": {"200": _resp("live", ok)}}},
        },
    }
    if not v2:
        for path in [p for p in doc["paths"] if p.startswith("/v2/models")]:
            del doc["paths"][path]
    return doc
