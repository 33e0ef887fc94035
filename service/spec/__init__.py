"""Pure: a Segment call becomes a normalised event, identity rules, Redis key names, profile decoding and
KPI maths. No I/O: everything here is tested with plain data."""
