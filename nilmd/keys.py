"""Redis key and channel names (docs/CONTRACT.md §3.1). Every other module asks here."""


def input_channel(building: str) -> str:
    return f"nilm:{building}:input"


def input_stream(building: str) -> str:
    # Pub/sub channels are not keys, so the stream could share the channel's name; its own name
    # keeps `redis-cli --scan` listings and the docs unambiguous.
    return f"nilm:{building}:input:stream"


def position_key(building: str) -> str:
    """The id of the newest stream entry already in the ring (nilmd.daemon.streams)."""
    return input_stream(building) + ":position"


def predictions_channel(building: str) -> str:
    return f"nilm:{building}:predictions"


def latest_key(building: str) -> str:
    return f"nilm:{building}:latest"


def status_key(building: str) -> str:
    return f"nilm:{building}:status"


def daemon_status_key(host: str) -> str:
    """A list daemon's own status hash (--building-ids): its processes and its buildings counted."""
    return f"nilm:nilmd:{host}:status"


def energy_key(building: str) -> str:
    """Energy per appliance, a hash: "<Appliance>:today_wh", ":month_wh", ":total_wh" (Wh; nilmd.daemon.ledger)."""
    return f"nilm:{building}:energy"


def events_channel(building: str) -> str:
    return f"nilm:{building}:events"


def events_stream(building: str) -> str:
    return events_channel(building) + ":stream"


def predictions_stream(building: str) -> str:
    return predictions_channel(building) + ":stream"


def runs_key(building: str) -> str:
    """The run tracker's state per appliance, so that a restarted inference continues a run."""
    return f"nilm:{building}:runs"


def lease_key(building: str) -> str:
    """Which nilmd instance serves the building, with --leases (nilmd.daemon.sharing)."""
    return f"nilm:{building}:lease"


def labels_stream(building: str) -> str:
    """Runs the owner confirmed (`nilmd label`; nilmd.labels): fields appliance, start, end, source."""
    return f"nilm:{building}:labels"
