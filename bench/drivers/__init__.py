"""Drivers, one per system, loaded on demand (a missing client library only disables its system)."""

from __future__ import annotations

import importlib

from bench.drivers.base import Driver

_DRIVERS = {
    "logbroker": ("bench.drivers.logbroker", "LogbrokerDriver"),
    "logbroker-tls": ("bench.drivers.logbroker", "LogbrokerTlsDriver"),
    "nats": ("bench.drivers.nats", "NatsDriver"),
    "rabbitmq": ("bench.drivers.rabbitmq", "RabbitmqDriver"),
    "redis": ("bench.drivers.redis", "RedisDriver"),
    "redis-native": ("bench.drivers.redis_native", "RedisNativeDriver"),
}
SYSTEMS = tuple(_DRIVERS)


def get_driver(name: str) -> Driver:
    try:
        module, cls = _DRIVERS[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}") from None
    driver: Driver = getattr(importlib.import_module(module), cls)()
    return driver
