"""Stage 3, ONNX: export, validation against onnxruntime, latency, accuracy and cost metrics."""
