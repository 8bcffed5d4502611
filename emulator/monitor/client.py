"""``MonitorClient``: the monitor's other end, for tests, scripts and ``virtio-emu monitor``.

One request at a time: send a line, read the reply line (its ``id`` must match). A refused
request raises ``MonitorError`` with the server's class and description; a connection that
breaks raises ``ConnectionError``.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from emulator.monitor.protocol import GREETING_KEY, MonitorError
from wire.jsonlines import JsonLinesClient


class MonitorClient(JsonLinesClient):
    """A connection to the monitor socket at ``path``; ``greeting`` is what the server said
    first (its ``version``, ``protocol`` and ``commands``)."""

    peer = "the monitor"

    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        super().__init__(path, timeout)
        self._ids = itertools.count(1)
        try:
            greeting = self.receive()
            if not isinstance(greeting.get(GREETING_KEY), dict):
                raise ConnectionError(f"{path} did not greet as a monitor: {greeting}")
        except BaseException:
            self.close()
            raise
        self.greeting: dict[str, Any] = greeting[GREETING_KEY]

    @property
    def commands(self) -> list[str]:
        return list(self.greeting.get("commands", []))

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value; ``MonitorError`` if refused."""
        msg_id = next(self._ids)
        request: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            request["arguments"] = arguments
        self.send(request)
        reply = self.receive()
        if reply.get("id") != msg_id:
            raise ConnectionError(f"reply to id {reply.get('id')} while {msg_id} was due")
        if "error" in reply:
            error = reply["error"]
            raise MonitorError(str(error.get("class")), str(error.get("desc")))
        return reply["return"]

    def query_status(self) -> dict[str, Any]:
        return dict(self.execute("query-status"))

    def query_regions(self) -> dict[str, Any]:
        return dict(self.execute("query-regions"))

    def query_mappings(self, shmid: int | None = None) -> dict[str, Any]:
        if shmid is None:
            return dict(self.execute("query-mappings"))
        return dict(self.execute("query-mappings", shmid=shmid))

    def query_counters(self) -> dict[str, Any]:
        return dict(self.execute("query-counters"))

    def device_reset(self) -> None:
        self.execute("device-reset")

    def drop_mappings(self, shmid: int | None = None) -> int:
        """Returns how many mappings were dropped."""
        reply = (
            self.execute("drop-mappings")
            if shmid is None
            else self.execute("drop-mappings", shmid=shmid)
        )
        return int(reply["dropped"])

    def disconnect_backend(self) -> bool:
        """True if a back-end was connected (and now is not, until it reconnects)."""
        return bool(self.execute("disconnect-backend")["disconnected"])
