"""``model`` is another name for :mod:`examples.imixer.imixer`, the module that defines the iMixer.

``from examples.imixer import model`` and ``from examples.imixer import imixer`` give the very same module
object, so the models are registered in timm once, under the module name ``imixer``
(``timm.list_models(module="imixer")``).
"""

import sys

from examples.imixer import imixer

sys.modules[__name__] = imixer
