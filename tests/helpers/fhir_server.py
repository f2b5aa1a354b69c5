"""A FHIR R4 receiving endpoint in its own process, for the tests of the FHIR destination.

It stands in for a FHIR server (HAPI FHIR, a vendor's EHR) because none runs here. It answers as one does
for what pneumoscreen sends: a transaction Bundle POSTed at the base URL, with conditional create
(``ifNoneExist``) and conditional update (``PUT Type?identifier=system|value``) honoured, ``urn:uuid:``
references resolved, 201/200 with ``Location`` per entry, all or nothing; a search by identifier
(``GET /DiagnosticReport?identifier=...``, a searchset Bundle) and a read (``GET /Type/id``). Every resource
it receives is validated with ``fhir.resources`` (the R4B models, R4's JSON) and with the required status
codes of the resources it stores; what it refuses is answered 400 with an OperationOutcome. A bearer token
can be required (401 otherwise). Asked to, it answers 500 to the first transaction, before storing anything
(``--fail-first before``) or after storing it (``--fail-first after``: an answer lost on the way).

What it holds (every version of every resource, and each request's outcome) is kept in a JSON file that
the test reads. Run as ``python -m tests.helpers.fhir_server --port P --store FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

FHIR_JSON = "application/fhir+json"
#: the required (status) bindings of the resources we receive
REQUIRED_CODES = {
    "DiagnosticReport": {"registered", "partial", "preliminary", "final", "amended", "corrected", "appended",
                         "cancelled", "entered-in-error", "unknown"},
    "Observation": {"registered", "preliminary", "final", "amended", "corrected", "cancelled", "entered-in-error",
                    "unknown"},
    "Device": {"active", "inactive", "entered-in-error", "unknown"},
}


class Refused(Exception):
    """Answered with ``status`` and an OperationOutcome saying ``text``."""

    def __init__(self, status: int, code: str, text: str) -> None:
        super().__init__(text)
        self.status, self.code = status, code


def outcome(status: int, code: str, text: str) -> JSONResponse:
    body = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": text}]}
    return JSONResponse(body, status_code=status, media_type=FHIR_JSON)


def validate(resource: dict[str, Any]) -> None:
    """Raises Refused unless ``resource`` is a valid R4 resource (structure, types, required codes)."""
    kind = resource.get("resourceType")
    try:
        model = get_fhir_model_class(kind)
    except (KeyError, ValueError, TypeError):
        raise Refused(400, "not-supported", f"unknown resource type {kind!r}") from None
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        raise Refused(400, "structure", f"{kind} does not validate: {exc}") from None
    allowed = REQUIRED_CODES.get(kind)
    if allowed is not None and resource.get("status") not in allowed:
        raise Refused(400, "code-invalid", f"{kind}.status {resource.get('status')!r} is not one of {sorted(allowed)}")


def matches(resource: dict[str, Any], token: str) -> bool:
    """The FHIR token search ``system|value``, ``|value`` or ``value`` on ``identifier``."""
    system, _, value = token.rpartition("|") if "|" in token else (None, "", token)
    return any(i.get("value") == value and (system is None or (i.get("system") or "") == system)
               for i in resource.get("identifier", []))


def resolve_references(node: Any, ids: dict[str, str]) -> None:
    """Replaces each ``reference`` naming a fullUrl of the transaction by the resource's ``Type/id``."""
    if isinstance(node, dict):
        reference = node.get("reference")
        if isinstance(reference, str) and reference.startswith("urn:uuid:"):
            if reference not in ids:
                raise Refused(400, "not-found", f"reference {reference} names no entry of the transaction")
            node["reference"] = ids[reference]
        for value in node.values():
            resolve_references(value, ids)
    elif isinstance(node, list):
        for value in node:
            resolve_references(value, ids)


class Store:
    """The server's resources (every version) and requests, in one JSON file written atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"resources": {}, "requests": [], "next_id": 1}
        self.save()

    def save(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data))
        os.replace(partial, self.path)

    def current(self, kind: str) -> dict[str, dict[str, Any]]:
        return {key: versions[-1] for key, versions in self.data["resources"].items() if key.split("/")[0] == kind}

    def find(self, kind: str, query: str) -> list[str]:
        tokens = parse_qs(query).get("identifier")
        if not tokens:
            raise Refused(400, "not-supported", f"only search by identifier is supported, not {query!r}")
        return [key for key, resource in self.current(kind).items() if matches(resource, tokens[0])]


def _target(store: Store, request: dict[str, Any], kind: str) -> tuple[str | None, bool]:
    """(the existing resource's ``Type/id`` or None for a new one, whether to write the resource)."""
    method, url = request.get("method"), request.get("url", "")
    if method == "POST":
        if not request.get("ifNoneExist"):
            return None, True
        found = store.find(kind, request["ifNoneExist"])
        if len(found) > 1:
            raise Refused(412, "multiple-matches", f"ifNoneExist {request['ifNoneExist']} matches {len(found)}")
        return (found[0], False) if found else (None, True)
    if method == "PUT" and "?" in url:
        path, _, query = url.partition("?")
        found = store.find(path, query)
        if len(found) > 1:
            raise Refused(412, "multiple-matches", f"conditional update {url} matches {len(found)} resources")
        return (found[0] if found else None), True
    if method == "PUT" and url.count("/") == 1:
        return url, True
    raise Refused(400, "not-supported", f"request {method} {url} is not supported")


def transaction(store: Store, bundle: dict[str, Any]) -> dict[str, Any]:
    """Applies a transaction Bundle, all or nothing; returns the transaction-response."""
    validate(bundle)
    if bundle.get("type") != "transaction":
        raise Refused(400, "invalid", f"a {bundle.get('type')} Bundle was posted, not a transaction")
    entries, ids, plan = bundle.get("entry", []), {}, []
    for entry in entries:
        resource, request = entry.get("resource") or {}, entry.get("request") or {}
        kind = resource.get("resourceType")
        if not request.get("url", "").startswith(kind or "?"):
            raise Refused(400, "invalid", f"entry of a {kind} with request url {request.get('url')!r}")
        key, write = _target(store, request, kind)
        if key is None:
            key = f"{kind}/{store.data['next_id']}"
            store.data["next_id"] += 1
        ids[entry.get("fullUrl", key)] = key
        plan.append((key, resource, write))
    for _, resource, _ in plan:
        resolve_references(resource, ids)
        validate(resource)
    answers = []
    for key, resource, write in plan:
        versions = store.data["resources"].setdefault(key, [])
        created = not versions
        if write:
            versions.append({**resource, "id": key.split("/")[1], "meta": {"versionId": str(len(versions) + 1)}})
        status = "201 Created" if created else "200 OK"
        answers.append({"response": {"status": status, "location": f"{key}/_history/{len(versions)}",
                                     "etag": f'W/"{len(versions)}"'}})
    return {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}


def make_app(store: Store, *, token: str | None, fail_first: str) -> FastAPI:
    app = FastAPI()
    failures = {"left": 0 if fail_first == "none" else 1}

    def authorized(request: Request) -> bool:
        return token is None or request.headers.get("authorization") == f"Bearer {token}"

    @app.post("/fhir")
    async def post_bundle(request: Request):
        if not authorized(request):
            return outcome(401, "login", "a valid bearer token is required")
        try:
            bundle = json.loads(await request.body())
        except ValueError as exc:
            return outcome(400, "structure", f"the body is not JSON: {exc}")
        with store.lock:
            snapshot = json.dumps(store.data)
            try:
                if failures["left"] and fail_first == "before":
                    failures["left"] -= 1
                    raise Refused(500, "transient", "the database is restarting (asked to fail first)")
                answer = transaction(store, bundle)
            except Refused as exc:
                store.data = json.loads(snapshot)
                store.data["requests"].append({"status": exc.status, "text": str(exc)})
                store.save()
                return outcome(exc.status, exc.code, str(exc))
            lost = bool(failures["left"]) and fail_first == "after"
            failures["left"] -= int(lost)
            store.data["requests"].append({"status": 500 if lost else 200, "text": "stored"})
            store.save()
        if lost:
            return outcome(500, "timeout", "the transaction was stored but the answer was lost (asked to fail first)")
        return JSONResponse(answer, media_type=FHIR_JSON)

    @app.get("/fhir/{kind}")
    def search(kind: str, request: Request):
        with store.lock:
            try:
                found = store.find(kind, str(request.url.query))
            except Refused as exc:
                return outcome(exc.status, exc.code, str(exc))
            current = store.current(kind)
            entries = [{"fullUrl": key, "resource": current[key], "search": {"mode": "match"}} for key in found]
        return JSONResponse({"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries},
                            media_type=FHIR_JSON)

    @app.get("/fhir/{kind}/{resource_id}")
    def read(kind: str, resource_id: str):
        with store.lock:
            versions = store.data["resources"].get(f"{kind}/{resource_id}")
        if not versions:
            return outcome(404, "not-found", f"{kind}/{resource_id} is not known")
        return JSONResponse(versions[-1], media_type=FHIR_JSON)

    return app


class FhirServer:
    """This endpoint in a subprocess on ``port``: ``url`` is its FHIR base, ``stored()`` what it holds."""

    def __init__(self, workdir: Path, port: int, *, token: str | None = None, fail_first: str = "none") -> None:
        from tests.helpers.processes import wait_for_port

        workdir.mkdir(parents=True, exist_ok=True)
        self.store_path, self.url = workdir / "fhir-store.json", f"http://127.0.0.1:{port}/fhir"
        self._log = open(workdir / "fhir-server.log", "wb")
        args = [sys.executable, "-m", "tests.helpers.fhir_server", "--port", str(port), "--store", str(self.store_path),
                "--fail-first", fail_first, *(["--token", token] if token else [])]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=Path(__file__).resolve().parents[2])
        wait_for_port(port, self.proc, timeout=30)

    def stored(self) -> dict[str, Any]:
        return json.loads(self.store_path.read_text())

    def current(self, kind: str) -> dict[str, dict[str, Any]]:
        """``Type/id`` -> the current version of each resource of ``kind``."""
        return {key: versions[-1] for key, versions in self.stored()["resources"].items() if key.startswith(kind + "/")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self._log.close()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--token")
    parser.add_argument("--fail-first", choices=["none", "before", "after"], default="none")
    args = parser.parse_args()
    app = make_app(Store(args.store), token=args.token, fail_first=args.fail_first)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
