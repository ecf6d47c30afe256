"""Each guest's own RabbitMQ user, made and removed through RabbitMQ's management HTTP API.

A guest lives in a tenant's machine: with the control plane's broker credentials it could
consume or purge the conductor's queue, read other guests' commands or delete queues.
Its own user may only

- publish to the conductor's exchange (never ``amq.default``, through which any queue can
  be reached),
- read its own command queue,
- configure nothing (the control plane declares every queue and exchange a guest uses),

within per-user connection and channel limits, and RabbitMQ checks the ``user_id`` of what
it publishes. The password is derived from the service key (dbaas.signing), so a
redelivered create writes the same one and nothing is stored. Deleting the user closes its
connections.

The embedded broker has no users: there, guests get the broker's URL as it is.
"""

import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import requests

from dbaas import settings, signing, wire

TIMEOUT = 10


class BrokerUserError(Exception):
    """RabbitMQ's management API refused or could not be reached."""


def is_rabbitmq(broker_url: str) -> bool:
    return urlsplit(broker_url.split(";")[0]).scheme in ("amqp", "amqps", "pyamqp")


def guest_url(broker_url: str, user: str, password: str, endpoint: tuple[str, int] | None = None) -> str:
    """``broker_url`` (each node of a failover list) with the guest's own credentials and,
    when given, the address the guest reaches the broker at."""
    urls = []
    for url in broker_url.split(";"):
        parts = urlsplit(url)
        host, port = endpoint or (parts.hostname, parts.port or 5672)
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}"
        urls.append(urlunsplit((parts.scheme, netloc, parts.path, "", "")))
    return ";".join(urls)


class BrokerUsers:
    def __init__(self, admin_url: str | None = None, broker_url: str | None = None):
        config = settings.get()
        self.broker_url = broker_url or config.broker_url
        self.admin_url = admin_url if admin_url is not None else config.broker_admin_url
        self.vhost = unquote(urlsplit(self.broker_url.split(";")[0]).path[1:]) or "/"
        self.conductor_exchange = config.conductor_queue
        self.max_connections = config.guest_max_connections
        self.max_channels = config.guest_max_channels

    @property
    def enabled(self) -> bool:
        return is_rabbitmq(self.broker_url)

    def ensure(self, instance_id: str, generation: int, endpoint: tuple[str, int] | None = None) -> str:
        """Create (or re-create, idempotently) the guest's user; the broker URL its config holds."""
        if not self.enabled:
            return self.broker_url
        user = wire.guest_broker_user(instance_id)
        password = signing.guest_broker_password(settings.get().service_key, instance_id, generation)
        self._call("PUT", f"users/{quote(user, safe='')}", {"password": password, "tags": ""})
        self._call("PUT", f"permissions/{quote(self.vhost, safe='')}/{quote(user, safe='')}", {
            "configure": "^$",
            "write": f"^{re.escape(self.conductor_exchange)}$",
            "read": f"^{re.escape(f'guestagent.{instance_id}')}$",
        })
        for limit, value in (("max-connections", self.max_connections),
                             ("max-channels", self.max_channels)):
            self._call("PUT", f"user-limits/{quote(user, safe='')}/{limit}", {"value": value})
        return guest_url(self.broker_url, user, password, endpoint)

    def remove(self, instance_id: str) -> None:
        """Delete the guest's user (RabbitMQ closes its connections); nothing if it is gone."""
        if self.enabled:
            self._call("DELETE", f"users/{quote(wire.guest_broker_user(instance_id), safe='')}",
                       missing_ok=True)

    def _call(self, method: str, path: str, body: dict | None = None, missing_ok: bool = False) -> None:
        if not self.admin_url:
            raise BrokerUserError("DBAAS_BROKER_ADMIN_URL is not set: the taskmanager cannot "
                                  "give the guest a broker user of its own")
        parts = urlsplit(self.admin_url)
        base = urlunsplit((parts.scheme, f"{parts.hostname}:{parts.port or 15672}", parts.path.rstrip("/"), "", ""))
        try:
            response = requests.request(method, f"{base}/api/{path}", json=body, timeout=TIMEOUT,
                                        auth=(unquote(parts.username or ""), unquote(parts.password or "")))
        except requests.RequestException as exc:
            raise BrokerUserError(f"RabbitMQ's management API is unreachable: {exc}") from None
        if response.status_code == 404 and missing_ok:
            return
        if response.status_code >= 300:
            raise BrokerUserError(f"RabbitMQ's management API answered {response.status_code} "
                                  f"to {method} {path}: {response.text[:200]}")
