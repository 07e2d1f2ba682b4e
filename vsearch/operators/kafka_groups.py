"""The two things the operator asks Kafka about a version's consumer group: its committed
offsets (how backfill idleness is judged: never the broker's end offsets or lag) and its
deletion when the version is retired."""

from __future__ import annotations

import logging
import threading

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

log = logging.getLogger(__name__)


class KafkaGroups:
    """One admin client per bootstrap, kept between calls (the operator asks every tick) and
    made again after an error."""

    def __init__(self, bootstrap: str, timeout_s: float = 10.0):
        self.bootstrap, self.timeout_s = bootstrap, timeout_s
        self._client = None
        self._lock = threading.Lock()

    def _call(self, fn):
        with self._lock:
            if self._client is None:
                self._client = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="vsearch-operator",
                                                request_timeout_ms=int(self.timeout_s * 1000))
            try:
                return fn(self._client)
            except Exception:
                self._close()                 # a broken connection is not reused
                raise

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001  (closing a broken client)
                pass

    def close(self) -> None:
        with self._lock:
            self._close()

    def committed(self, group: str) -> dict[str, int]:
        """``{"topic/partition": committed offset}`` of ``group`` (empty before its first commit)."""
        got = self._call(lambda admin: admin.list_group_offsets(group).get(group, {}))
        return {f"{tp.topic}/{tp.partition}": int(om.offset) for tp, om in got.items() if om.offset >= 0}

    def delete(self, group: str) -> bool:
        """Delete ``group``; True when it is gone (or never existed)."""
        try:
            result = self._call(lambda admin: admin.delete_groups([group]))   # {group: "OK" | error name}
        except KafkaError as exc:
            log.warning("deleting consumer group %s: %s", group, exc)
            return False
        items = result.items() if isinstance(result, dict) else result
        for _gid, res in items:
            name = res if isinstance(res, str) else type(res).__name__
            if name not in ("OK", "GroupIdNotFoundError"):
                log.warning("deleting consumer group %s: %s", group, name)
                return False
        return True
