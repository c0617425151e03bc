"""cratescale: CRATE-MAE pretraining at scale."""
