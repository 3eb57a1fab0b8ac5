"""actsparse_deploy: calibrate activation masks, squash them into the model,
export a validated ONNX model.

    >>> from actsparse_deploy import ActivationSparsifier, calibrate, Recipe, Masks
"""

__version__ = "0.1.0"

from .calibrate import calibrate  # noqa: E402
from .masks import Masks  # noqa: E402
from .recipe import Recipe  # noqa: E402
from .sparsifier import ActivationSparsifier  # noqa: E402
from .squash import squash, squash_  # noqa: E402

__all__ = ["ActivationSparsifier", "Masks", "Recipe", "__version__", "calibrate", "squash", "squash_"]
