"""Validate MQTT discovery messages the way Home Assistant does, with Home Assistant's own code.

Run with a Python that has the `homeassistant` package (a separate environment: its pins clash with
monitord's). Reads a JSON list of {"topic", "payload"} on stdin; writes a JSON list of
{"topic", "component", "ok", "error", "dropped", "config"}: the payload's keys are expanded exactly as
homeassistant.components.mqtt.discovery does (abbreviations, device and origin abbreviations, the "~"
topic base), then checked by the component's DISCOVERY_SCHEMA; "dropped" lists keys the schema
silently removed (an unknown key there is a key Home Assistant ignores).
"""

from __future__ import annotations

import json
import sys


def expand(payload: dict) -> dict:
    from homeassistant.components.mqtt.abbreviations import ABBREVIATIONS, DEVICE_ABBREVIATIONS, ORIGIN_ABBREVIATIONS
    from homeassistant.components.mqtt.discovery import TOPIC_BASE

    payload = {ABBREVIATIONS.get(k, k): v for k, v in payload.items()}
    if "device" in payload:
        payload["device"] = {DEVICE_ABBREVIATIONS.get(k, k): v for k, v in payload["device"].items()}
    if "origin" in payload:
        payload["origin"] = {ORIGIN_ABBREVIATIONS.get(k, k): v for k, v in payload["origin"].items()}
    if "availability" in payload:
        payload["availability"] = [{ABBREVIATIONS.get(k, k): v for k, v in a.items()} if isinstance(a, dict) else a
                                   for a in payload["availability"]]
    if TOPIC_BASE in payload:
        base = payload.pop(TOPIC_BASE)
        for key, value in payload.items():
            if isinstance(value, str) and value and key.endswith("topic"):
                if value[0] == TOPIC_BASE:
                    payload[key] = f"{base}{value[1:]}"
                if value[-1] == TOPIC_BASE:
                    payload[key] = f"{value[:-1]}{base}"
    return payload


def check(topic: str, raw: str) -> dict:
    import importlib

    import voluptuous as vol
    from homeassistant.components.mqtt.discovery import MQTT_ORIGIN_INFO_SCHEMA, SUPPORTED_COMPONENTS, TOPIC_MATCHER

    out = {"topic": topic, "component": None, "ok": False, "error": None, "dropped": [], "config": None}
    prefix, _, rest = topic.partition("/")
    match = TOPIC_MATCHER.match(rest)
    if not match:
        out["error"] = f"not a discovery topic Home Assistant accepts: {topic}"
        return out
    component = match.group("component")
    out["component"] = component
    if component not in SUPPORTED_COMPONENTS:
        out["error"] = f"component {component} is not supported"
        return out
    payload = expand(json.loads(raw))
    try:
        if "origin" in payload:
            MQTT_ORIGIN_INFO_SCHEMA(payload["origin"])
        schema = importlib.import_module(f"homeassistant.components.mqtt.{component}").DISCOVERY_SCHEMA
        config = schema(payload)
    except vol.Invalid as exc:
        out["error"] = str(exc)
        return out
    out["ok"] = True
    out["dropped"] = sorted(set(payload) - set(config))
    out["config"] = json.loads(json.dumps(config, default=str))
    return out


def main() -> None:
    messages = json.load(sys.stdin)
    json.dump([check(m["topic"], m["payload"]) for m in messages], sys.stdout)


if __name__ == "__main__":
    main()
