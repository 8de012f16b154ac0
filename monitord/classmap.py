"""YAMNet's class map: the names of its 521 AudioSet classes, in output order.

Read by the config checks (class and group names), the model itself and the wire format's model
fingerprint; it depends on nothing else of monitord, so all of them import it downward.
"""

from __future__ import annotations

import csv
from pathlib import Path

BUILTIN_CLASS_MAP = Path(__file__).parent / "inference" / "models" / "yamnet_class_map.csv"


def yamnet_class_names(class_map: str | None) -> tuple[str, ...]:
    """Display names in output order, from YAMNet's class map CSV (index, mid, display_name)."""
    path = Path(class_map) if class_map else BUILTIN_CLASS_MAP
    with path.open(newline="", encoding="utf-8") as f:
        return tuple(row["display_name"] for row in csv.DictReader(f))
