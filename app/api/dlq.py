"""Dead letters: GET /dlq, GET /dlq/{id}, POST /dlq/{id}/redrive, POST /dlq/redrive (x-api-key)."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from app import dead_letters
from app.auth import require_api_key
from app.db import get_session
from app.errors import ApiError
from app.schemas import dead_letter_query, dead_letter_redrive
from models import DeadLetter

bp = Blueprint("dlq", __name__)


def _letter(letter_id: str) -> DeadLetter:
    letter = (
        get_session().get(DeadLetter, int(letter_id))
        if letter_id.isascii() and letter_id.isdigit()
        else None
    )
    if letter is None:
        raise ApiError(404, "not_found", "No such dead letter.", {"id": ["Unknown id."]})
    return letter


def _redrive(ids: list[int]) -> list[dead_letters.Redrive]:
    cfg = current_app.config["NOTIFIER"]
    get_session().close()  # the redrive commits on its own connection
    return dead_letters.redrive(
        current_app.extensions["db.engine"], current_app.extensions["redis"], cfg.STREAM_KEY, ids
    )


@bp.get("/dlq")
@require_api_key("admin")
def list_dead_letters() -> Response:
    args = dead_letter_query.load(request.args.to_dict())
    q = dead_letters.filtered(args).order_by(DeadLetter.id.desc()).limit(args["limit"])
    if "before" in args:
        q = q.where(DeadLetter.id < args["before"])
    letters = list(get_session().execute(q).scalars())
    more = len(letters) == args["limit"]
    return jsonify(
        {
            "dead_letters": [dead_letters.as_json(d) for d in letters],
            "next_before": letters[-1].id if letters and more else None,
        }
    )


@bp.get("/dlq/<letter_id>")
@require_api_key("admin")
def get_dead_letter(letter_id: str) -> Response:
    return jsonify(dead_letters.as_json(_letter(letter_id), full=True))


@bp.post("/dlq/<letter_id>/redrive")
@require_api_key("admin")
def redrive_one(letter_id: str) -> Response:
    [result] = _redrive([_letter(letter_id).id])
    if not result.redriven:
        raise ApiError(409, "not_redrivable", f"Dead letter {result.id}: {result.reason}.")
    return jsonify({"id": result.id, "redriven": True})


@bp.post("/dlq/redrive")
@require_api_key("admin")
def redrive_many() -> Response:
    body = request.get_json(silent=True)
    if body is None and not request.get_data():
        body = {}
    if not isinstance(body, dict):
        raise ApiError(
            400, "invalid_json", "Send a JSON object.", {"body": ["Expected an object."]}
        )
    criteria = dead_letter_redrive.load(body)
    ids = dead_letters.matching_ids(get_session(), criteria, criteria["limit"])
    results = _redrive(ids)
    return jsonify(
        {
            "redriven": [r.id for r in results if r.redriven],
            "skipped": [{"id": r.id, "reason": r.reason} for r in results if not r.redriven],
        }
    )
