"""Offline tools on finished runs: `python -m facerec.tools.compare` (scale comparisons) and
`python -m facerec.tools.export` (TorchScript / ONNX)."""
