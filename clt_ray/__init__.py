"""clt-ray: cross-layer transcoder research at scale on Ray.

`clt_ray` holds the math and the formats (no Ray import anywhere in it); `clt_ray.actors`
(the repo's top-level `actors/` folder) holds Ray placement, messaging and recovery.
"""

__version__ = "0.1.0"
