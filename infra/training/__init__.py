"""Training on Ray: connecting to a cluster and checking placements (``cluster``), the Ray Train trainer and
its worker function, Tune's LR search, per-epoch MLflow logging from Train's controller, and every use of
Ray's private APIs (``ray_private``)."""
