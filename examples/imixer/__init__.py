"""The iMixer example: the model (registered in timm on import), its data sets, training and conversion scripts.

Import it from the repository root::

    from examples.imixer import imixer
    net = timm.create_model("imixer_t4_32", num_classes=10)

Importing the package registers ``imixer_*`` and ``mixer_t*`` in timm under the module name ``imixer``.
"""

from examples.imixer import imixer as imixer
