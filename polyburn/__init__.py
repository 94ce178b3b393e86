"""polyburn: Dataloop polygon annotations to exact segmentation masks.

The package holds the Prefect-free core (parsing, geometry repair, burning, encoding, sources and
destinations). The Prefect tasks live in the top-level ``tasks`` package and the flows in ``flows``.
"""

__version__ = "0.1.0"
