"""``sepconv-classify``: a command-line client for the server, over ``/v1``, OIP REST or gRPC.

Light on purpose: it needs httpx (HTTP), grpcio (gRPC) and the protocol codecs in
:mod:`service.protocols`, never the engine, ONNX Runtime or the web framework, so
``pip install sepconv-serve[client]`` is enough to talk to a server running elsewhere.
"""
