"""Model server: ONNX-exported XGBoost models and contextual-bandit policies over gRPC."""
