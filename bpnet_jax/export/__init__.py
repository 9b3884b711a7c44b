"""Deployment: ONNX (fp32/fp16) in `onnx_model`, INT8 calibration in `int8`, TensorRT engines
and TF SavedModels in `runtimes`, and the `bpnet export` task in `task`."""
