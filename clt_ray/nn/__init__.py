"""The CLT itself (layer 2): the module (`clt`), its losses (`losses`) and the one training step
(`step`) that one process and every Ray shard run, with collectives passed in as callbacks."""
