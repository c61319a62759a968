"""Export stage: ONNX with taps and steers, its torch-free contract, Triton, onnxruntime validation.

Kept import-light: the server imports `elude_export.export.contract` without torch.
"""
