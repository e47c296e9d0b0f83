"""Torch-free gRPC serving of exported bundles: recommend, cold-start encode, hot reload.

Entry points: `python -m serve --bundles DIR` (server), `python -m serve.client ...` (client),
`serve.server.start(ServerConfig(...))` (in-process). Generated stubs live in `serve._gen`
(`python -m protos.build`).
"""
