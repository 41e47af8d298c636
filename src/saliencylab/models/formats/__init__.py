"""One adapter per external model format; each returns the same `Classifier` as the registry does.

Heavy imports (keras, onnx, transformers) happen inside the adapter that needs them.
"""
