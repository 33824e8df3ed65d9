"""The Redis names are the contract with meters and dashboards (README, "Redis interface"): this
is the one place that spells them out; everything else asks nilmd.keys."""

from nilmd import keys


def test_every_redis_name_is_the_documented_one():
    assert keys.input_channel("b") == "nilm:b:input"
    assert keys.input_stream("b") == "nilm:b:input:stream"
    assert keys.position_key("b") == "nilm:b:input:stream:position"
    assert keys.predictions_channel("b") == "nilm:b:predictions"
    assert keys.latest_key("b") == "nilm:b:latest"
    assert keys.status_key("b") == "nilm:b:status"
    assert keys.energy_key("b") == "nilm:b:energy"
    assert keys.events_channel("b") == "nilm:b:events"
    assert keys.events_stream("b") == "nilm:b:events:stream"
    assert keys.predictions_stream("b") == "nilm:b:predictions:stream"
    assert keys.runs_key("b") == "nilm:b:runs"
