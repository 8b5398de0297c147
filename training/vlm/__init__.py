"""VLM supervised fine-tuning: VQA dataset builder (dataset.py), LLaMA-Factory configs (configs/),
the Ray Train job (train.py) and the `cmrvl train vqa-dataset` command (cli.py)."""
