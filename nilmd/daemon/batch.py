"""A batch of raw meter messages and the building each one is for: what every input source
(nilmd.daemon.sources, nilmd.daemon.streams) hands the reader (nilmd.daemon.reader)."""

from __future__ import annotations


class Batch(list):
    """Raw messages, and beside them the building each one is for."""

    def __init__(self):
        super().__init__()
        self.buildings: list[str] = []

    def put(self, raw, building: str) -> None:
        self.append(raw)
        self.buildings.append(building)

    def extend_for(self, building: str, messages: list) -> None:
        self.extend(messages)
        self.buildings.extend([building] * len(messages))

    def groups(self) -> dict[str, list]:
        out: dict[str, list] = {}
        for raw, building in zip(self, self.buildings):
            out.setdefault(building, []).append(raw)
        return out
