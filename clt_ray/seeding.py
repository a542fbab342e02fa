"""Fixed seeds derived from integers (layer 0): the same on every Python version and machine, so a
CLT's init and a data stream's shuffling depend only on their seeds."""


def mix_seed(*parts: int) -> int:
    """A fixed 63-bit seed from integers."""
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p) + 0x9E3779B97F4A7C15) % (2**63 - 1)
    return h
