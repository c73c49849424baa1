"""Runtime: one Runner interface over torch / onnxruntime / TensorRT, tiling, inference, parity, bench."""
