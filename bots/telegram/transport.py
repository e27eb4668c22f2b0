"""The getUpdates transport: one malformed update must not stall long polling.

python-telegram-bot parses a whole getUpdates answer at once; one update it cannot parse
makes it drop the batch without confirming it, so the same batch comes back at once, for
ever. This transport (PTB's own, with the answer checked on the way in) replaces an
update that does not parse by an empty one with the same id: it is confirmed, and the
adapter ignores it with a debug log.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from telegram import Update
from telegram.request import HTTPXRequest, RequestData

log = logging.getLogger(__name__)


class SanitisingRequest(HTTPXRequest):
    """:class:`HTTPXRequest` whose getUpdates answers only hold updates that parse."""

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[int, bytes]:
        """See :meth:`telegram.request.BaseRequest.do_request`."""
        status, payload = await super().do_request(url, method, request_data, *args, **kwargs)
        if status != 200 or not url.endswith("/getUpdates"):
            return status, payload
        return status, sanitise_updates(payload)


def sanitise_updates(payload: bytes) -> bytes:
    """A getUpdates answer with each update that does not parse emptied (id kept)."""
    try:
        body = json.loads(payload)
        result = body["result"]
        if not isinstance(result, list):
            return payload
    except (ValueError, KeyError, TypeError):
        return payload  # not ours to judge: PTB reports a broken answer itself
    clean: list[Any] = []
    changed = False
    for entry in result:
        update_id = entry.get("update_id") if isinstance(entry, dict) else None
        if not isinstance(update_id, int):
            log.debug("telegram: dropped an update without an id: %.200r", entry)
            changed = True
            continue
        try:
            Update.de_json(entry, None)
        except Exception as exc:
            log.debug("telegram: update %d does not parse (%s); ignored", update_id, exc)
            entry, changed = {"update_id": update_id}, True
        clean.append(entry)
    if not changed:
        return payload
    body["result"] = clean
    return json.dumps(body).encode()
