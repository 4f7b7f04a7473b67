"""The one place Great Expectations is imported: analytics off first, nothing sent anywhere.

GX is imported lazily (about 3 s) so that `import plantad.validation` stays cheap and free of
side effects; the environment variable is set just before the first import.
"""

from __future__ import annotations

import os
from types import ModuleType


def load_gx() -> ModuleType:
    """Return the `great_expectations` module with its analytics disabled for this process."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx

    return gx
