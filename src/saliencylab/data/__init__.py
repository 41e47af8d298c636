"""Image and DICOM loading, bundled sample photos, input expansion."""

from saliencylab.data.images import (
    DEFAULT_SAMPLES,
    IMAGE_EXTENSIONS,
    LoadedImage,
    expand_inputs,
    iter_images,
    load_image,
    sample_names,
)

__all__ = [
    "DEFAULT_SAMPLES",
    "IMAGE_EXTENSIONS",
    "LoadedImage",
    "expand_inputs",
    "iter_images",
    "load_image",
    "sample_names",
]
