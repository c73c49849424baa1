"""Export: ONNX fp32/fp16 with TLC, static tiles, deploy folding, TensorRT engines, manifest, lint."""
