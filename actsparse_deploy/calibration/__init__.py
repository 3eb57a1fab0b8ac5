"""Stage 1, calibration: the sparsifier, its functions and methods, recipes, statistics, compensation, masks, torch.distributed."""
