"""vpo_ray: VPO (Aligning Text-to-Video Generation Models with Prompt Optimization) on Ray."""
__version__ = "0.1.0"
