"""megactor-rt: a fast inference engine for MegActor v1 (raw-video-driven portrait animation).

Import direction: config -> models -> export -> engine -> runtime -> cli. Importing this package has no
side effects and does not import torch-heavy submodules eagerly.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
