"""lasad_plugins: the TensorRT LasadStep plugin and the ONNX custom-op contract."""
