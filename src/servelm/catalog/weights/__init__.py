"""Model weights on disk: the verified default model (``default_model``) and any
catalog entry's files from the Hugging Face Hub (``hub``, behind `models pull`)."""
