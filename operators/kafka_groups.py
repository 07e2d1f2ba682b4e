"""The two things the operator asks Kafka about a version's consumer group: its committed
offsets (how backfill idleness is judged: never the broker's end offsets or lag) and its
deletion when the version is retired."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class KafkaGroups:
    def __init__(self, bootstrap: str, timeout_s: float = 10.0):
        self.bootstrap, self.timeout_s = bootstrap, timeout_s

    def _admin(self):
        from kafka.admin import KafkaAdminClient
        return KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="vsearch-operator",
                                request_timeout_ms=int(self.timeout_s * 1000))

    def committed(self, group: str) -> dict[str, int]:
        """``{"topic/partition": committed offset}`` of ``group`` (empty before its first commit)."""
        admin = self._admin()
        try:
            got = admin.list_group_offsets(group).get(group, {})
            return {f"{tp.topic}/{tp.partition}": int(om.offset) for tp, om in got.items() if om.offset >= 0}
        finally:
            admin.close()

    def delete(self, group: str) -> bool:
        """Delete ``group``; True when it is gone (or never existed)."""
        from kafka.errors import KafkaError
        admin = self._admin()
        try:
            result = admin.delete_groups([group])          # {group: "OK" | error name}
            items = result.items() if isinstance(result, dict) else result
            for _gid, res in items:
                name = res if isinstance(res, str) else type(res).__name__
                if name not in ("OK", "GroupIdNotFoundError"):
                    log.warning("deleting consumer group %s: %s", group, name)
                    return False
            return True
        except KafkaError as exc:
            log.warning("deleting consumer group %s: %s", group, exc)
            return False
        finally:
            admin.close()
