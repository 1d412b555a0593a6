"""The OpenAPI schema with this deployment's limits, so that Swagger and clients see the real bounds.

Route declarations are fixed at import time, but IMGSIM_MAX_K and IMGSIM_MAX_BATCH_SIZE are
settings: the schema gets them when it is first built.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def with_limits(schema: dict[str, Any], max_k: int, max_files: int) -> dict[str, Any]:
    """Set ``k``'s maximum, the image count's maximum and the files' minimum length wherever
    they appear (in place)."""

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            props = node.get("properties", {})
            if "k" in props:
                props["k"]["maximum"] = max_k
            files = props.get("file", {})
            if files.get("type") == "array":
                files.setdefault("maxItems", max_files)
                files.get("items", {})["minLength"] = 1  # an empty part is refused (422): say so
            for p in node.get("parameters", []):
                if p.get("name") == "k":
                    p["schema"]["maximum"] = max_k
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(schema)
    return schema


def without_form_nulls(schema: dict[str, Any]) -> dict[str, Any]:
    """Optional multipart fields as plain types, and no fields besides the declared ones (in place).

    Pydantic writes ``str | None`` as ``anyOf: [string, null]``, but a multipart form cannot
    send a null: an optional field is simply left out. Clients generated from the schema
    would otherwise send the text "null" or an empty part.
    """
    components = schema.get("components", {}).get("schemas", {})
    for path in schema.get("paths", {}).values():
        for op in path.values():
            form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
            ref = form.get("schema", {}).get("$ref", "")
            body = components.get(ref.rsplit("/", 1)[-1], {})
            if body:
                body["additionalProperties"] = False  # a field the route does not take is a 422 (uploads.known_fields)
            for prop in body.get("properties", {}).values():
                kinds = [a for a in prop.pop("anyOf", []) if a.get("type") != "null"]
                if len(kinds) == 1:
                    prop.update(kinds[0])
                elif kinds:
                    prop["anyOf"] = kinds
                if prop.get("examples") == [None]:
                    del prop["examples"]
    return schema


def install(app: FastAPI, max_k: int, max_files: int) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = with_limits(without_form_nulls(build()), max_k, max_files)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema
