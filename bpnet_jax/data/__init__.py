"""Data: records (`records`), dataset specs (`dataset_spec`), COCO conversion (`convert`),
synthetic datasets (`synthetic`, `synthetic_dataset`) and the training input pipeline
(`input_pipeline`)."""
