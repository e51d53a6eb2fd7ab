"""The inference engine: runtime (ONNX Runtime session), batcher, decoding, the Classifier seam.

Nothing here imports a web framework or Prometheus; metrics and traces reach it through the
:class:`~service.engine.observer.EngineObserver` it is given.
"""
