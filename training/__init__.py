"""Training-side measurement of the models: evaluation beside baselines (raw pixels,
ImageNet features), and its plots. The service never imports it."""
