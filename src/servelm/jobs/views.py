"""What clients see of jobs: Segmind's async shapes, OpenAI's batch and file objects,
the lines of output and error files, and the webhook event."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from servelm.billing.clock import as_utc
from servelm.billing.money import format_credits

SEGMIND_STATUS = {
    "queued": "QUEUED",
    "in_progress": "PROCESSING",
    "completed": "COMPLETED",
    "failed": "FAILED",
    "expired": "FAILED",
    "cancelling": "CANCELLED",
    "cancelled": "CANCELLED",
}


def ts(value: datetime | None) -> int | None:
    moment = as_utc(value)
    return int(moment.timestamp()) if moment is not None else None


def async_links(job: dict[str, Any], base_url: str) -> dict[str, Any]:
    rid = job["id"]
    return {
        "request_id": rid,
        "status": SEGMIND_STATUS[job["status"]],
        "status_url": f"{base_url}/v2/requests/{rid}/status",
        "response_url": f"{base_url}/v2/requests/{rid}",
    }


def async_status(job: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "request_id": job["id"],
        "status": SEGMIND_STATUS[job["status"]],
        "model": job["model"],
        "created_at": ts(job["created_at"]),
        "started_at": ts(job["started_at"]),
        "finished_at": ts(job["finished_at"]),
    }
    if job["status"] in ("completed", "failed"):
        out["cost"] = format_credits(job["cost"])
    return out


def batch_object(job: dict[str, Any]) -> dict[str, Any]:
    extra = job.get("extra") or {}
    status = job["status"]
    done = status in ("completed", "cancelled", "expired", "failed")
    finished = ts(job["finished_at"])
    return {
        "id": job["id"],
        "object": "batch",
        "endpoint": extra.get("endpoint", "/v1/chat/completions"),
        "errors": None,
        "input_file_id": job["input_file_id"],
        "completion_window": extra.get("completion_window", "24h"),
        "status": status,
        "output_file_id": job["output_file_id"] if done and job["completed"] else None,
        "error_file_id": job["error_file_id"] if done and job["total"] > job["completed"] else None,
        "created_at": ts(job["created_at"]),
        "in_progress_at": ts(job["started_at"]),
        "expires_at": ts(job["expires_at"]),
        "finalizing_at": finished,
        "completed_at": finished if status == "completed" else None,
        "failed_at": None,
        "expired_at": finished if status == "expired" else None,
        "cancelling_at": None,
        "cancelled_at": finished if status == "cancelled" else None,
        "request_counts": {
            "total": job["total"],
            "completed": job["completed"],
            "failed": job["failed"],
        },
        "metadata": extra.get("metadata"),
        # servelm's own: what the batch cost so far (decimal credits).
        "cost": format_credits(job["cost"]),
    }


def file_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": ts(row["created_at"]),
        "expires_at": ts(row["expires_at"]),
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "status_details": None,
    }


def result_line(line: dict[str, Any]) -> dict[str, Any]:
    """One line of a batch's output or error file, in OpenAI's shape."""
    body = json.loads(line["result"]) if line["result"] else None
    rid = f"batch_req_{line['job_id'].removeprefix('batch_')}_{line['line_no']}"
    out: dict[str, Any] = {"id": rid, "custom_id": line["custom_id"], "error": None}
    if line["status"] in ("cancelled", "expired"):
        out["response"] = None
        out["error"] = (body or {}).get("error")
        return out
    out["response"] = {"status_code": line["status_code"], "request_id": rid, "body": body}
    if line["status_code"] != 200:
        err = (body or {}).get("error") or {}
        out["error"] = {"code": err.get("code") or err.get("type"), "message": err.get("message")}
    return out


def event(job: dict[str, Any]) -> dict[str, Any]:
    """The webhook's payload (OpenAI's event shape, Segmind's status inside for async)."""
    kind = "batch" if job["kind"] == "batch" else "request"
    data = batch_object(job) if job["kind"] == "batch" else async_status(job)
    return {
        "object": "event",
        "id": f"evt_{job['id']}",
        "type": f"{kind}.{job['status']}",
        "created_at": ts(job["finished_at"]),
        "data": data,
    }


def console_row(job: dict[str, Any]) -> dict[str, Any]:
    """A job as the account console lists it: the status its own API says (Segmind's
    for an async request, OpenAI's for a batch), its lines and its cost so far."""
    is_async = job["kind"] == "async"
    return {
        "id": job["id"],
        "kind": "async request" if is_async else "batch",
        "model": job["model"] or "",
        "key": job["key_public"],
        "status": SEGMIND_STATUS[job["status"]] if is_async else job["status"],
        "total": job["total"],
        "completed": job["completed"],
        "failed": job["failed"],
        "cost": job["cost"],
        "created_at": job["created_at"],
    }
