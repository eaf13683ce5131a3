"""A trained model leaving the run: the S3 model store (safetensors + manifest, the champion pointer), the
MLflow logged model and registry version, its pyfunc, and loading a published model back."""
