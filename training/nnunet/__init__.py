"""nnU-Net v2 dataset preparation: ACDC, M&Ms and Sunnybrook converters."""
