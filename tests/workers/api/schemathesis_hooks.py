"""Loaded by schemathesis's command line (``SCHEMATHESIS_HOOKS``, test_openapi.py): the
check every 4xx answer must pass besides schemathesis's own."""

import schemathesis


@schemathesis.check
def trove_fault_body(ctx, response, case):
    """Every 4xx is Trove's fault body, ``{"<name>": {"code": <status>, "message": "…"}}``
    as application/json: python-troveclient reads nothing else."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type == "application/json", f"a {response.status_code} as {content_type!r}"
    body = response.json()
    assert isinstance(body, dict) and len(body) == 1, f"not a fault body: {body!r}"[:300]
    (detail,) = body.values()
    assert isinstance(detail, dict) and detail.get("code") == response.status_code \
        and isinstance(detail.get("message"), str), f"not a fault body: {body!r}"[:300]
    return None
