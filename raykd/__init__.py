"""raykd: distil skin-lesion classifiers at cluster scale with Ray."""

import os as _os

# albumentations checks PyPI for a newer version on import (in every Ray worker, too); runs here
# have no network, so the check only costs a timeout.
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
