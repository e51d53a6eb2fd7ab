"""Peer servers for the same ONNX model, and ``python -m bench.peers`` to measure them.

A platform engineer choosing a model server compares it with what they would otherwise run:

- ``fastapi``: the server a user writes in ten minutes (:mod:`bench.peers.plain_fastapi`);
- ``kserve``: KServe's Python model server with a custom ``kserve.Model``
  (:mod:`bench.peers.kserve_model`), installed in its own virtual environment
  (:mod:`bench.peers.venvs`) because it pins much of the web stack;
- raw ONNX Runtime in-process (:mod:`bench.raw_ort`) as the ceiling.

Every peer runs the same preprocessing (:mod:`sepconv.preprocess`) and the same model file, so
the difference measured is the serving stack. Modules the peer processes import
(:mod:`bench.peers.common`, the two servers) depend only on numpy, onnxruntime, Pillow, pydantic
and :mod:`sepconv`: the KServe environment has those and nothing of this project's.
"""
