"""fmct_ray: pretrain and evaluate 3D head-CT foundation models (FM-CT, VoxelFM) on Ray clusters."""

__version__ = "0.1.0"
