"""funnelrec: an industrial-grade multi-stage recommender system on a KuaiRand-calibrated simulator.

The funnel (retrieval → ranking → fusion → re-ranking → serving) and the world it runs on live in sub-packages:
``funnelrec.sim`` (the simulated world and its oracle), ``funnelrec.data`` (schema, loaders, ``RequestBatch``),
``funnelrec.metrics``, ``funnelrec.train``, ``funnelrec.ranking`` and ``funnelrec.bench``.
"""

__version__ = "0.1.0"
