"""Inference: preprocessing and geometry (`preprocess`), backends (`backends`), the
`Predictor`, post-processing (`postprocess.decode`), detection.json (`detections`), COCO
keypoint evaluation (`coco_eval`) and drawing (`visualize`)."""
