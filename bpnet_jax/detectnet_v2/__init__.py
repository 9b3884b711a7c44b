"""DetectNet_v2 (TAO's grid-based "GridBox" detector) on the shared bpnet_jax machinery.

Modules and their entry points:
  config       default_config() (the experiment schema: the original's training spec
               sections), validate(config), class_names(config)
  model        build_model(model_config, num_classes): stride-16 ResNet/VGG backbone with the
               output_cov (sigmoid) and output_bbox (linear) heads; layer_spec, layer_graph
  targets      make_targets / make_batch_targets: coverage, box, cov_norm and loss-mask maps
               (pure JAX), TargetParams.from_config
  losses       detection_loss: weighted coverage BCE + cov_norm-weighted box L1, auto-weighting
               state, regularization_from_config
  postprocess  decode(cov, bbox, config, class_names): DBSCAN / NMS / HYBRID clustering
  evaluate     evaluate(detections, ground_truth, config, class_names): per-class AP, mAP
  convert      convert(spec, output_prefix): KITTI labels or COCO JSON -> records
  records      the detection record format (msgpack in ArrayRecord files)
  synthetic    make_synthetic(out_dir, num_images): a procedural KITTI-format dataset
  cli          `detectnet_v2 <command>` (dataset_convert, make_synthetic, summary)

Nothing is re-exported here, so importing one module does not import the others.
"""
