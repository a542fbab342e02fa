"""The Ray layer of clt-ray: placement, messaging and recovery only.

Every computation is delegated to `clt_ray`; see docs/design.md §1.
"""
