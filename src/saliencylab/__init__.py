"""saliencylab: what did the image classifier look at, and can we trust that?"""

from saliencylab.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "__version__"]
