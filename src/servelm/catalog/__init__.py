"""The catalog: model specs, the models file (models, prices, plans) and model weights."""
